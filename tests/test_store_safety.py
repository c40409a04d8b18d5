"""A crash-safe store (DESIGN.md section 7): every file written atomically, a crash at any
instant leaves the previous version intact, leftovers recovered when a Store opens, corrupt
records and checkpoints refused clearly (naming wb:// paths, never server paths), and a
failed load_state leaves the run exactly as it was. Store and engine units, then one real
server process with two tenants through the SDK."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import server.store as store_mod
from server.engine.engine import AdapterConfig, Engine, EngineDatum, ForwardItem
from server.engine.errors import EngineInputError
from server.store import RunCorruptedError, Store
from workbench.errors import InvalidRequestError, NotFoundError, ServerError

QWEN = "tiny-qwen3"
META = {"base_model": QWEN, "lora": {"rank": 2, "alpha": 2.0, "seed": 0}, "user_metadata": None}


def tensors_of(value: float, n: int = 3) -> dict[str, torch.Tensor]:
    return {f"base_model.model.layer{i}.lora_A.weight": torch.full((2, 4), value + i) for i in range(n)}


def optimizer_of(value: float) -> dict:
    state = {0: {"step": torch.tensor(float(value)), "exp_avg": torch.full((2, 4), value),
                 "exp_avg_sq": torch.full((2, 4), abs(value))}}
    return {"optimizer": {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
            "steps": int(value)}


def hidden_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "runs").rglob(".*"))


def saved_value(store: Store, uri: str, tenant: str = "alice") -> float:
    """Which version a checkpoint holds, checking that its files are one consistent version."""
    tensors, config, optimizer = store.load_checkpoint(uri, tenant)
    value = float(tensors["base_model.model.layer0.lora_A.weight"][0, 0])
    assert config["version"] == value and optimizer["steps"] == int(value)
    assert tensors.keys() == tensors_of(value).keys()
    return value


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    yield s
    s.close()


def new_run_with_checkpoint(store: Store) -> tuple[str, str]:
    run_id = store.new_run("alice", META)
    uri = store.save_checkpoint("alice", run_id, "weights", "ckpt", tensors_of(1.0), {"version": 1.0},
                                optimizer_of(1.0))
    return run_id, uri


class Snapshots:
    """Wraps the store's disk operations so that before and after each one (and halfway
    through each file written) the whole store is copied: a crash at that instant leaves
    exactly that copy."""

    def __init__(self, root: Path, into: Path, monkeypatch):
        self.root, self.into, self.taken = root, into, []
        write, replace, rmtree = store_mod._write_bytes, os.replace, shutil.rmtree

        def wrapped_write(path, data):
            self.take()
            with open(path, "xb") as f:  # a half-written file, as a crash mid-write leaves it
                f.write(data[:len(data) // 2])
            self.take()
            os.unlink(path)
            write(path, data)
            self.take()

        def wrapped(fn):
            def call(*args, **kwargs):
                self.take()
                out = fn(*args, **kwargs)
                self.take()
                return out
            return call

        monkeypatch.setattr(store_mod, "_write_bytes", wrapped_write)
        monkeypatch.setattr(os, "replace", wrapped(replace))
        monkeypatch.setattr(shutil, "rmtree", wrapped(rmtree))
        self._copytree = shutil.copytree

    def take(self) -> None:
        dest = self.into / f"snap-{len(self.taken):03d}"
        self._copytree(self.root, dest, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
        self.taken.append(dest)


# -------------------------------------------------------------------- crashes (store)


def test_a_crash_at_any_instant_of_a_save_leaves_the_old_or_the_new_checkpoint(store, tmp_path, monkeypatch):
    run_id, uri = new_run_with_checkpoint(store)
    with monkeypatch.context() as m:
        snaps = Snapshots(store.root, tmp_path / "snaps", m)
        store.save_checkpoint("alice", run_id, "weights", "ckpt", tensors_of(2.0), {"version": 2.0},
                              optimizer_of(2.0))
    assert len(snaps.taken) > 10
    seen = []
    for snap in snaps.taken:
        reopened = Store(snap)
        try:
            seen.append(saved_value(reopened, uri))
            assert hidden_leftovers(snap) == [], snap.name  # recovered and cleaned at open
            assert [r["run_id"] for r in reopened.list_runs("alice")] == [run_id]
            assert [c["path"] for c in reopened.list_checkpoints(run_id, "alice")] == [uri]
        finally:
            reopened.close()
    assert seen[0] == 1.0 and seen[-1] == 2.0 and set(seen) == {1.0, 2.0}
    assert saved_value(store, uri) == 2.0 and hidden_leftovers(store.root) == []


def test_a_crash_at_any_instant_of_creating_a_run_leaves_no_trace_or_the_whole_run(store, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        snaps = Snapshots(store.root, tmp_path / "snaps", m)
        run_id = store.new_run("alice", META)
    for snap in snaps.taken:
        reopened = Store(snap)
        try:
            runs = reopened.list_runs("alice")
            assert runs == [] or [r["run_id"] for r in runs] == [run_id]
            assert hidden_leftovers(snap) == [] and [p.name for p in (snap / "runs").iterdir()] in ([], [run_id])
        finally:
            reopened.close()
    assert reopened.list_runs("alice") and store.run_meta(run_id, "alice")["tenant"] == "alice"


@pytest.mark.parametrize("mode", ["once", "from_then_on"])
def test_a_failure_at_each_step_of_a_save_keeps_the_old_checkpoint(store, monkeypatch, mode):
    """An OSError at each write or rename (once: the rollback works; from then on: it fails
    too, and the next Store puts the old checkpoint back)."""
    run_id, uri = new_run_with_checkpoint(store)
    calls = []
    write, replace = store_mod._write_bytes, os.replace

    def counting(fn):
        def call(*args):
            calls.append(fn)
            return fn(*args)
        return call

    with monkeypatch.context() as m:
        m.setattr(store_mod, "_write_bytes", counting(write))
        m.setattr(os, "replace", counting(replace))
        store.save_checkpoint("alice", run_id, "weights", "ckpt", tensors_of(9.0), {"version": 9.0}, optimizer_of(9.0))
    steps = len(calls)
    assert steps >= 5  # three files, then two renames
    for fail_at in range(steps):
        count = [0]

        def failing(fn):
            def call(*args):
                count[0] += 1
                if count[0] == fail_at + 1 or (mode == "from_then_on" and count[0] > fail_at):
                    raise OSError(errno.EIO, "Input/output error", str(args[0]))
                return fn(*args)
            return call

        with monkeypatch.context() as m:
            m.setattr(store_mod, "_write_bytes", failing(write))
            m.setattr(os, "replace", failing(replace))
            with pytest.raises(ServerError, match=r"saving checkpoint wb://.*/weights/ckpt failed") as info:
                store.save_checkpoint("alice", run_id, "weights", "ckpt", tensors_of(3.0 + fail_at),
                                      {"version": 3.0 + fail_at}, optimizer_of(3.0 + fail_at))
        assert str(store.root) not in str(info.value) and "tmp-" not in str(info.value)
        if mode == "once":
            assert saved_value(store, uri) == 9.0 and hidden_leftovers(store.root) == []
        store.close()
        store.__init__(store.root)  # what a restart does
        assert saved_value(store, uri) == 9.0 and hidden_leftovers(store.root) == []
        assert [r["run_id"] for r in store.list_runs("alice")] == [run_id]


def test_a_full_disk_gives_a_clear_error_and_keeps_every_file(store, monkeypatch):
    run_id, uri = new_run_with_checkpoint(store)
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}

    def disk_full(path, data):
        with open(path, "xb") as f:
            f.write(data[:len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_mod, "_write_bytes", disk_full)
    for attempt in (
        lambda: store.save_checkpoint("alice", run_id, "weights", "ckpt", tensors_of(5.0), {"version": 5.0},
                                      optimizer_of(5.0)),
        lambda: store.save_checkpoint("alice", run_id, "sampler_weights", "new", tensors_of(5.0), {}),
        lambda: store.new_run("alice", META),
    ):
        with pytest.raises(ServerError, match="disk is full") as info:
            attempt()
        assert str(store.root) not in str(info.value)
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before
    assert hidden_leftovers(store.root) == []
    assert [r["run_id"] for r in store.list_runs("alice")] == [run_id] and saved_value(store, uri) == 1.0


def test_leftovers_are_recovered_when_a_store_opens_and_only_then(store):
    run_id, uri = new_run_with_checkpoint(store)
    kind = store.root / "runs" / run_id / "weights"
    # A swap that stopped between its renames: the old copy aside, the new one complete.
    os.replace(kind / "ckpt", kind / ".ckpt.old-0123abcd")
    shutil.copytree(kind / ".ckpt.old-0123abcd", kind / ".ckpt.tmp-0123abcd")
    shutil.copytree(kind / ".ckpt.old-0123abcd", kind / ".gone.deleted-0badf00d")
    shutil.copytree(kind / ".ckpt.old-0123abcd", kind / ".x.old-y.old-00000001")  # a name holding ".old-"
    (kind / "x.old-y").mkdir()
    (store.root / "runs" / ".run-123.tmp-89abcdef").mkdir()
    assert len(hidden_leftovers(store.root)) == 5
    # While this store is open (a live server), another Store on the root touches nothing.
    second = Store(store.root)
    assert len(hidden_leftovers(store.root)) == 5
    second.close()
    store.close()
    reopened = Store(store.root)
    try:
        assert hidden_leftovers(store.root) == [] and saved_value(reopened, uri) == 1.0
        assert sorted(p.name for p in kind.iterdir()) == ["ckpt", "x.old-y"]
    finally:
        reopened.close()


# ------------------------------------------------------------- corrupt records (store)


@pytest.mark.parametrize("content", [b"", b"{\"run_id\": ", b"[]", b"\xff\xfe", b'{"run_id": "run-other"}'])
def test_a_corrupt_run_record_breaks_no_listing(store, content):
    a_run, _ = new_run_with_checkpoint(store)
    b_run = store.new_run("bob", META)
    good = store.new_run("alice", META)
    (store.root / "runs" / a_run / "run.json").write_bytes(content)
    assert [r["run_id"] for r in store.list_runs("bob")] == [b_run]
    assert [r["run_id"] for r in store.list_runs("alice")] == [good]
    with pytest.raises(RunCorruptedError, match="corrupted") as info:  # its owner is told
        store.run_meta(a_run, "alice")
    assert isinstance(info.value, InvalidRequestError) and str(store.root) not in str(info.value)
    with pytest.raises(RunCorruptedError):
        store.load_checkpoint(f"wb://{a_run}/weights/ckpt", "alice")
    with pytest.raises(NotFoundError, match="not found"):  # anyone else: as if it did not exist
        store.run_meta(a_run, "bob")
    (store.root / "runs" / a_run / "owner").unlink()  # a store from before owner files
    with pytest.raises(NotFoundError, match="not found"):
        store.run_meta(a_run, "alice")


def test_corrupt_and_non_finite_checkpoints_are_refused_by_wb_path(store):
    run_id, uri = new_run_with_checkpoint(store)
    ckpt = store.root / "runs" / run_id / "weights" / "ckpt"
    pristine = {f.name: f.read_bytes() for f in ckpt.iterdir()}

    def damaged(name: str, data: bytes):
        for f, content in pristine.items():
            (ckpt / f).write_bytes(data if f == name else content)
        with pytest.raises(InvalidRequestError) as info:
            store.load_checkpoint(uri, "alice")
        assert uri in str(info.value) and info.value.where == "path"
        assert str(store.root) not in str(info.value) and "safetensors" not in str(info.value)
        return str(info.value)

    weights = pristine["adapter_model.safetensors"]
    assert "corrupt" in damaged("adapter_model.safetensors", weights[:len(weights) // 2])
    assert "corrupt" in damaged("adapter_model.safetensors", b"")
    assert "corrupt" in damaged("adapter_config.json", b"{not json")
    assert "corrupt" in damaged("optimizer.safetensors", b"\x00" * 8)
    for where, name in (("weights", "adapter_model.safetensors"), ("optimizer state", "optimizer.safetensors")):
        for bad in (float("nan"), float("inf")):
            tmp = store.root / "bad.safetensors"
            if name == "adapter_model.safetensors":
                save_file({k: torch.full_like(v, bad) for k, v in tensors_of(1.0).items()}, str(tmp))
            else:
                flat, meta = store_mod._flatten_optimizer(optimizer_of(1.0))
                flat["state.0.exp_avg"][0, 1] = bad
                save_file(flat, str(tmp), metadata={"meta": json.dumps(meta)})
            message = damaged(name, tmp.read_bytes())
            assert "NaN or infinite" in message and where in message
    for f, content in pristine.items():
        (ckpt / f).write_bytes(content)
    assert saved_value(store, uri) == 1.0


# ------------------------------------------------------------- load_state (engine)


@pytest.fixture(scope="module")
def engine():
    e = Engine(device="cpu")
    e.load_model(QWEN)
    return e


def loss_of(engine: Engine, adapter_id: str) -> float:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4000, 9)
    datum = EngineDatum(tokens[:-1].copy(), {"target_tokens": tokens[1:].copy(), "weights": np.ones(8, np.float32)})
    return engine.forward([ForwardItem(adapter_id, [datum])], backward=False)[0].metrics["loss:sum"]


def test_a_refused_replace_leaves_the_adapter_exactly_as_it_was(engine):
    config = AdapterConfig(rank=2, alpha=4.0, seed=1, train_unembed=False)
    live = engine.create_adapter("live", QWEN, config)
    with torch.no_grad():
        for pair in live.pairs.values():
            pair.lora_B.normal_(std=0.05)
    good, _ = engine.export_adapter("live")
    optimizer = engine.optimizer_state("live")
    before = {k: v.clone() for k, v in good.items()}
    loss, slot, ids = loss_of(engine, "live"), live.slot, set(engine.adapters)
    key = next(iter(good))

    def variant(change):
        tensors = {k: v.clone() for k, v in good.items()}
        change(tensors)
        return tensors

    engine.create_adapter("wide", QWEN, AdapterConfig(rank=2, alpha=4.0, seed=1))  # with unembed
    extra = engine.export_adapter("wide")[0]
    engine.remove_adapter("wide")
    refusals = [
        (variant(lambda t: t[key].fill_(float("nan"))), None, "NaN or infinite"),
        (variant(lambda t: t.__setitem__(key, torch.zeros(3, 3))), None, "has shape"),
        (variant(lambda t: t.pop(key)), None, "has no"),
        (variant(lambda t: [t.pop(k) for k in list(t)[2:]]), None, "modules differ"),
        (extra, None, "modules differ"),
        ({"something.else": torch.zeros(2)}, None, "no LoRA tensors"),
        (good, {**optimizer, "steps": "x"}, "optimizer state does not fit"),
        (good, {"optimizer": {**optimizer["optimizer"], "param_groups": []}, "steps": 1}, "does not fit"),
    ]
    moments = {"optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(5),
                                           "exp_avg_sq": torch.zeros(5)}},
                             "param_groups": optimizer["optimizer"]["param_groups"]}, "steps": 1}
    refusals.append((good, moments, "has shape"))
    shape = tuple(good[key].shape)
    nan_moments = {"optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.full(shape, float("nan")),
                                               "exp_avg_sq": torch.zeros(shape)}},
                                 "param_groups": optimizer["optimizer"]["param_groups"]}, "steps": 1}
    refusals.append((good, nan_moments, "NaN"))
    for tensors, opt_state, word in refusals:
        with pytest.raises(EngineInputError, match=word):
            engine.replace_adapter("live", tensors, opt_state)
        assert engine.adapters["live"] is live and live.slot == slot and set(engine.adapters) == ids
        now, _ = engine.export_adapter("live")
        assert all(torch.equal(now[k], before[k]) for k in before)
        assert loss_of(engine, "live") == loss
    # A good checkpoint replaces it (all modules, finite), and the same results follow.
    replaced = engine.replace_adapter("live", good, optimizer)
    assert replaced is not live and engine.adapters["live"] is replaced and set(engine.adapters) == ids
    assert loss_of(engine, "live") == loss
    engine.remove_adapter("live")


def test_import_adapter_is_all_or_nothing(engine):
    config = AdapterConfig(rank=2, alpha=4.0, seed=2)
    engine.create_adapter("source", QWEN, config)
    good, _ = engine.export_adapter("source")
    ids = set(engine.adapters)
    bad = {k: (torch.full_like(v, float("inf")) if i == len(good) - 1 else v) for i, (k, v) in enumerate(good.items())}
    with pytest.raises(EngineInputError, match="NaN or infinite"):
        engine.import_adapter("copy", QWEN, config, bad, trainable=True)
    with pytest.raises(EngineInputError, match="does not fit"):
        engine.import_adapter("copy", QWEN, config, good, trainable=True, optimizer_state={"steps": 0})
    with pytest.raises(EngineInputError, match="exists already"):
        engine.import_adapter("source", QWEN, config, good, trainable=True)
    assert set(engine.adapters) == ids
    engine.import_adapter("copy", QWEN, config, good, trainable=True)
    assert loss_of(engine, "copy") == loss_of(engine, "source")
    engine.remove_adapter("copy")
    engine.remove_adapter("source")


# ---------------------------------------------------- end to end: two tenants, the SDK


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import start_server

    root = tmp_path_factory.mktemp("store_safety")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"key-a": "alice", "key-b": "bob"}))
    running = start_server(root, "--models", QWEN, "--api-keys", str(keys), api_key="key-a")
    running.store_root = root / "store"
    yield running
    running.stop(timeout=30)


def clients(served):
    import workbench as wb

    return (wb.ServiceClient(base_url=served.url, api_key="key-a"),
            wb.ServiceClient(base_url=served.url, api_key="key-b"))


def sdk_data():
    from workbench import types

    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 3000, 13)
    return [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(12)})]


def test_a_bad_checkpoint_is_refused_and_the_run_trains_on_unchanged(served):
    import workbench as wb
    from workbench import types

    alice, _ = clients(served)
    data, adam = sdk_data(), types.AdamParams(learning_rate=1e-2)
    runs = [alice.create_lora_training_client(base_model=QWEN, rank=4, seed=11) for _ in range(2)]
    for run in runs:  # the same work on both: one is the reference the other must keep matching
        run.forward_backward(data, "cross_entropy").result(60)
        run.optim_step(adam).result(60)
    tested, twin = runs
    good = tested.save_state("good").result(60).path
    run_id = good[len("wb://"):].split("/")[0]
    weights = served.store_root / "runs" / run_id / "weights"
    saved = load_file(str(weights / "good" / "adapter_model.safetensors"))
    bad = {
        "nan": ({k: torch.full_like(v, float("nan")) for k, v in saved.items()}, "NaN or infinite"),
        "shape": ({k: (v[:, :-1].contiguous() if i == 0 else v) for i, (k, v) in enumerate(saved.items())},
                  "has shape"),
        "truncated": (None, "corrupt"),
    }
    for name, (tensors, _) in bad.items():  # written by hand beside the good checkpoint
        shutil.copytree(weights / "good", weights / name)
        target = weights / name / "adapter_model.safetensors"
        if tensors is None:
            target.write_bytes(target.read_bytes()[:100])
        else:
            save_file(tensors, str(target), metadata={"format": "pt"})
    loss = tested.forward(data, "cross_entropy").result(60).metrics["loss:sum"]
    listed = len(alice.create_rest_client().list_training_runs(limit=100).result(60).training_runs)
    for name, (_, word) in bad.items():
        uri = f"wb://{run_id}/weights/{name}"
        for op, attempt in (("load_state", lambda: tested.load_state(uri).result(60)),
                            ("load_state", lambda: tested.load_state_with_optimizer(uri).result(60)),
                            ("from_state", lambda: alice.create_training_client_from_state(uri)),
                            ("sampler", lambda: alice.create_sampling_client(model_path=uri))):
            with pytest.raises(wb.InvalidRequestError, match=word) as info:
                attempt()
            message = str(info.value)
            assert str(served.store_root) not in message and "/tmp" not in message
            if op != "sampler" or name != "shape":  # the sampler path names the tensor alone
                assert uri in message, (op, message)
        assert tested.forward(data, "cross_entropy").result(60).metrics["loss:sum"] == loss
    # No run was left behind by the refused create_training_client_from_state calls.
    assert len(alice.create_rest_client().list_training_runs(limit=100).result(60).training_runs) == listed
    # The run trains on exactly like its twin that never saw a bad checkpoint.
    for run in runs:
        run.forward_backward(data, "cross_entropy").result(60)
        run.optim_step(adam).result(60)
    after = [run.forward(data, "cross_entropy").result(60).metrics["loss:sum"] for run in runs]
    np.testing.assert_allclose(after[0], after[1], rtol=1e-6)
    assert after[0] != loss
    # And a good checkpoint still loads.
    tested.load_state_with_optimizer(good).result(60)
    assert tested.forward(data, "cross_entropy").result(60).metrics["loss:sum"] == loss


def test_a_corrupt_run_record_of_one_tenant_leaves_everyone_listing(served):
    import workbench as wb

    alice, bob = clients(served)
    doomed = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=5)
    doomed.save_state("s").result(60)
    kept = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=6)
    bobs = bob.create_lora_training_client(base_model=QWEN, rank=4, seed=7)
    (served.store_root / "runs" / doomed.model_id / "run.json").write_bytes(b"")  # what a full disk left
    bob_rest, alice_rest = bob.create_rest_client(), alice.create_rest_client()
    bob_runs = {r.training_run_id for r in bob_rest.list_training_runs(limit=100).result(60).training_runs}
    alice_runs = {r.training_run_id for r in alice_rest.list_training_runs(limit=100).result(60).training_runs}
    assert bobs.model_id in bob_runs and doomed.model_id not in bob_runs
    assert kept.model_id in alice_runs and doomed.model_id not in alice_runs
    assert alice_rest.list_user_checkpoints().result(60) is not None
    assert bob_rest.get_training_run(bobs.model_id).result(60).training_run_id == bobs.model_id
    record = alice_rest.get_training_run(doomed.model_id).result(60)  # its owner is told, as Tinker tells it
    assert record.corrupted and record.training_run_id == doomed.model_id
    with pytest.raises(wb.NotFoundError):  # another tenant learns nothing
        bob_rest.get_training_run(doomed.model_id).result(60)
