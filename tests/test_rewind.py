"""Rewind (TrainingClient.rewind): a run's last optim_steps undone bit for bit, fp32 on CPU.

A rewound run that takes the same steps again ends exactly (torch.equal) where a run that
never took the undone ones does: weights, AdamW moments and step counts, hyperparameters.
Gradients accumulated since the last step are discarded; beyond the kept depth, or for
zero or negative steps, a clear refusal that changes nothing; neighbours (adapters stepped
in the same call, another tenant's run in the same cycle) are untouched; the history
survives parking and spilling and a checkpoint load clears it. Then the same through a real
server process and the SDK.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine_helpers import QWEN, adapter_maker, random_datum
from server.engine.engine import Engine, EngineInputError, ForwardItem

make_adapter = adapter_maker("rewind", 3)
ADAM = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
WILD = dict(ADAM, learning_rate=0.3, beta2=0.5, weight_decay=0.0)  # the steps that get undone


def state(engine, adapter_id) -> dict:
    """A copy of everything a step changes or a rewind restores: weights, AdamW state and
    hyperparameters, step count, and the accumulated gradients."""
    tensors, _ = engine.export_adapter(adapter_id)
    adapter = engine.adapters[adapter_id]
    return {"weights": {k: v.clone() for k, v in tensors.items()},
            "optimizer": copy.deepcopy(engine.optimizer_state(adapter_id)),
            "grads": [None if p.grad is None else p.grad.clone() for p in adapter.parameters()]}


def assert_same(got: dict, want: dict) -> None:
    assert got["weights"].keys() == want["weights"].keys()
    for name, value in want["weights"].items():
        assert torch.equal(got["weights"][name], value), name
    g, w = got["optimizer"], want["optimizer"]
    assert g["steps"] == w["steps"]
    assert g["optimizer"]["param_groups"] == w["optimizer"]["param_groups"]
    assert g["optimizer"]["state"].keys() == w["optimizer"]["state"].keys()
    for index, entry in w["optimizer"]["state"].items():
        assert entry.keys() == g["optimizer"]["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(g["optimizer"]["state"][index][key], value), (index, key)
    assert len(got["grads"]) == len(want["grads"])
    for a, b in zip(got["grads"], want["grads"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def backward(engine, adapter_id, datum) -> None:
    assert engine.forward([ForwardItem(adapter_id, [datum])], backward=True)[0].metrics


def step(engine, adapter_id, datum, adam=ADAM) -> dict:
    backward(engine, adapter_id, datum)
    return engine.optim_step(adapter_id, adam)


def twins(engine, seed):
    """Two adapters with the same initial weights: one to rewind, one that never steps wrong."""
    (rid, _), (uid, _) = make_adapter(engine, rank=4, seed=seed), make_adapter(engine, rank=4, seed=seed)
    assert_same(state(engine, rid), state(engine, uid))
    return rid, uid


def batches(seed, n):
    rng = np.random.default_rng(seed)
    return [random_datum(rng, 9 + k) for k in range(n)]


# ------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu", rewind_depth=3)


def test_rewound_steps_taken_again_equal_the_uninterrupted_run_bitwise(engine):
    rid, uid = twins(engine, seed=1)
    good, wrong = batches(1, 4), batches(2, 2)
    for d in good[:2]:
        step(engine, rid, d)
        step(engine, uid, d)
    at_two = state(engine, uid)
    for d in wrong:  # different data and hyperparameters: all of it must be undone
        step(engine, rid, d, WILD)
    assert engine.rewindable(rid) == 3
    assert engine.rewind(rid, 2) == {"steps": 2, "step": 2, "rewindable": 1}
    assert_same(state(engine, rid), at_two)
    for d in good[2:]:
        assert step(engine, rid, d) == step(engine, uid, d)  # grad norms and step counts
    assert_same(state(engine, rid), state(engine, uid))


def test_rewinding_the_first_steps_gives_the_fresh_adapter_back(engine):
    """Before the first step an adapter has no AdamW state at all: it has none again."""
    rid, uid = twins(engine, seed=2)
    fresh = state(engine, rid)
    for d in batches(3, 2):
        step(engine, rid, d, WILD)
    engine.rewind(rid, 2)
    assert_same(state(engine, rid), fresh)
    assert engine.optimizer_state(rid)["optimizer"]["state"] == {}
    d = batches(4, 1)[0]
    assert step(engine, rid, d) == step(engine, uid, d)
    assert_same(state(engine, rid), state(engine, uid))


def test_gradients_accumulated_since_the_last_step_are_discarded(engine):
    rid, uid = twins(engine, seed=3)
    good, wrong = batches(5, 3), batches(6, 2)
    step(engine, rid, good[0])
    step(engine, uid, good[0])
    step(engine, rid, wrong[0], WILD)
    backward(engine, rid, wrong[1])  # gradients of a step never taken
    engine.rewind(rid, 1)
    assert all(p.grad is None for p in engine.adapters[rid].parameters())
    for d in good[1:]:
        step(engine, rid, d)
        step(engine, uid, d)
    assert_same(state(engine, rid), state(engine, uid))


def test_beyond_the_depth_zero_or_negative_is_refused_and_changes_nothing(engine):
    rid, _ = make_adapter(engine, rank=4, seed=4)
    assert engine.rewindable(rid) == 0
    with pytest.raises(EngineInputError, match="cannot rewind 1 optim_steps: 0 can be undone"):
        engine.rewind(rid, 1)
    for d in batches(7, 5):  # more steps than the depth (3): the oldest snapshots are dropped
        step(engine, rid, d)
    backward(engine, rid, batches(8, 1)[0])  # pending gradients must survive a refusal too
    before = state(engine, rid)
    for steps in (4, 0, -1, True, 1.0):
        with pytest.raises(EngineInputError) as info:
            engine.rewind(rid, steps)
        assert info.value.where == "steps"
        assert f"cannot rewind {steps!r} optim_steps: 3 can be undone" in str(info.value)
        assert_same(state(engine, rid), before)
    assert engine.rewindable(rid) == 3
    assert engine.rewind(rid, 3)["step"] == 2


def test_a_neighbour_stepped_in_the_same_call_is_untouched(engine):
    rid, _ = make_adapter(engine, rank=4, seed=5)
    nid, _ = make_adapter(engine, rank=8, seed=6)
    d = batches(9, 3)
    for k in range(2):
        backward(engine, rid, d[k])
        backward(engine, nid, d[k])
        assert all(isinstance(r, dict) for r in engine.optim_steps([(rid, ADAM), (nid, WILD)]))
    backward(engine, nid, d[2])  # the neighbour's own pending gradients
    before = state(engine, nid)
    engine.rewind(rid, 2)
    assert_same(state(engine, nid), before)
    assert engine.rewindable(nid) == 2


def test_a_refused_non_finite_step_takes_no_place_in_the_history(engine):
    rid, uid = twins(engine, seed=7)
    good = batches(10, 2)
    step(engine, rid, good[0])
    step(engine, uid, good[0])
    backward(engine, rid, good[1])
    result = engine.optim_steps([(rid, dict(ADAM, learning_rate=3e38, weight_decay=0.0))])[0]
    assert isinstance(result, EngineInputError) and "optim_step refused" in str(result)
    assert engine.rewindable(rid) == 1  # only the accepted step
    assert_same(state(engine, rid), state(engine, uid))  # the refusal changed nothing
    engine.rewind(rid, 1)
    engine.rewind(uid, 1)
    assert_same(state(engine, rid), state(engine, uid))


def test_the_history_survives_parking_and_spilling(tmp_path):
    """Parked adapters keep their snapshots in host memory; spilled ones write them to their
    spill file with the rest of their state and read them back when used."""
    engine = Engine(device="cpu", rewind_depth=2, max_resident_adapters=1, max_host_adapters=0,
                    spill_dir=str(tmp_path))
    rid, uid = twins(engine, seed=8)
    good, wrong = batches(11, 3), batches(12, 1)
    for d in good[:2]:
        step(engine, rid, d)
        step(engine, uid, d)  # uses uid: rid is parked, then spilled (no room on the host)
    step(engine, rid, wrong[0], WILD)
    step(engine, uid, good[2])
    assert rid in engine._spilled
    spilled = [t for snap in engine.adapters[rid].optimizer.history for t in snap.tensors.values()]
    assert spilled and all(t.numel() == 0 for t in spilled)  # freed: the file holds them
    assert engine.rewindable(rid) == 2
    engine.rewind(rid, 1)
    step(engine, rid, good[2])
    assert_same(state(engine, rid), state(engine, uid))


def test_a_checkpoint_load_clears_the_history(engine):
    rid, uid = twins(engine, seed=9)
    for d in batches(13, 2):
        step(engine, rid, d)
    tensors, _ = engine.export_adapter(uid)
    engine.replace_adapter(rid, {k: v.clone() for k, v in tensors.items()},
                           copy.deepcopy(engine.optimizer_state(uid)))
    assert engine.rewindable(rid) == 0
    with pytest.raises(EngineInputError, match="0 can be undone"):
        engine.rewind(rid, 1)


def test_depth_zero_keeps_nothing():
    engine = Engine(device="cpu")
    rid, _ = make_adapter(engine, rank=4, seed=10)
    step(engine, rid, batches(14, 1)[0])
    assert engine.rewindable(rid) == 0 and not engine.adapters[rid].optimizer.history
    with pytest.raises(ValueError, match="rewind_depth"):
        Engine(device="cpu", rewind_depth=-1)


# ------------------------------------------------------------- through a real server

import workbench as wb  # noqa: E402
from conftest import start_tenants_server, text_datum  # noqa: E402
from workbench import types  # noqa: E402
from workbench.errors import InvalidRequestError  # noqa: E402

KEYS = {"key-a": "alice", "key-b": "bob"}
LR, WILD_LR = types.AdamParams(learning_rate=1e-2, weight_decay=0.1), types.AdamParams(learning_rate=0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A fixed clock, so that requests submitted together share a cycle.
    running = start_tenants_server(tmp_path_factory.mktemp("rewind"), KEYS, "--cycle-ms", "250",
                                   "--rewind-depth", "3")
    yield running
    running.stop(timeout=30)


@pytest.fixture(scope="module")
def alice(server):
    return wb.ServiceClient(base_url=server.url, api_key="key-a")


@pytest.fixture(scope="module")
def bob(server):
    return wb.ServiceClient(base_url=server.url, api_key="key-b")


@pytest.fixture(scope="module")
def texts(alice):
    tok = alice.create_sampling_client(base_model=QWEN).get_tokenizer()
    return [text_datum(tok, text) for text in (
        "the sky is blue", "the grass is green and tall", "a red fox runs", "rain falls on the hills",
        "never train on this", "nor on this one either")]


def saved(client, service, tmp_path, name) -> dict:
    """Every tensor and the metadata of the run's training state, read from the files a
    save_state writes (weights + optimizer), downloaded through the RestClient."""
    path = client.save_state(name).result(60).path
    folder = Path(service.create_rest_client().download_checkpoint(path, tmp_path / name).result(60))
    out = {}
    for file in sorted(p for p in folder.iterdir() if p.suffix == ".safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({f"{file.name}:{k}": f.get_tensor(k) for k in f.keys()})
            out[f"{file.name}:meta"] = json.dumps(f.metadata() or {}, sort_keys=True)
    return out


def assert_same_files(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if torch.is_tensor(value):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def fb_step(client, datum, adam=LR):
    fb, opt = client.forward_backward([datum], "cross_entropy"), client.optim_step(adam)
    fb.result(60)
    return opt.result(60)


def test_sdk_rewind_then_the_same_steps_equal_the_uninterrupted_run(alice, texts, tmp_path):
    rewound = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=21)
    straight = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=21)
    good, wrong = texts[:4], texts[4:]
    for d in good[:2]:  # one run at a time: each pass alone, so the runs' numerics match bit for bit
        fb_step(rewound, d)
        fb_step(straight, d)
    for d in wrong:
        fb_step(rewound, d, WILD_LR)
    rewound.forward_backward([good[0]], "cross_entropy").result(60)  # gradients to be discarded
    seen = []
    rewound.add_listener(lambda step, kind, metrics: seen.append((step, kind, metrics)))
    out = rewound.rewind(2).result(60)
    assert (out.steps, out.step, out.rewindable) == (2, 2, 1)
    assert rewound.optim_steps == 2 and seen == [(2, "rewind", {"steps": 2.0})]
    for d in good[2:]:
        assert fb_step(rewound, d).metrics == fb_step(straight, d).metrics
    assert rewound.optim_steps == straight.optim_steps == 4
    assert_same_files(saved(rewound, alice, tmp_path, "rewound"), saved(straight, alice, tmp_path, "straight"))


def test_sdk_refusals_are_clear_and_change_nothing(alice, texts, tmp_path):
    run = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=22)
    with pytest.raises(InvalidRequestError, match=rf"training run '{run.model_id}' cannot rewind 1 optim_step: "
                                                  r"0 can be undone .*--rewind-depth"):
        run.rewind().result(60)
    for d in texts[:4]:
        fb_step(run, d)
    before = saved(run, alice, tmp_path, "before")
    with pytest.raises(InvalidRequestError) as info:
        run.rewind(4).result(60)
    message = str(info.value)
    assert info.value.where == "steps"
    assert all(part in message for part in (repr(run.model_id), "cannot rewind 4 optim_steps", "3 can be undone",
                                            "last 3 optim_steps", "nothing was changed"))
    for steps in (0, -2):
        with pytest.raises(InvalidRequestError, match=rf"steps must be an integer >= 1 .* got {steps}"):
            run.rewind(steps).result(60)
    assert run.optim_steps == 4
    assert_same_files(saved(run, alice, tmp_path, "after"), before)
    # A checkpoint load starts afresh: nothing before it can be undone.
    run.load_state_with_optimizer(run.save_state("again").result(60).path).result(60)
    with pytest.raises(InvalidRequestError, match="0 can be undone"):
        run.rewind().result(60)


def test_another_tenants_run_in_the_same_cycle_is_unaffected(alice, bob, texts, tmp_path):
    """Bob's optim_step shares a cycle with Alice's rewind; Bob ends exactly where the same
    steps taken with nobody else around leave a twin of his run."""
    a = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=23)
    b = bob.create_lora_training_client(base_model=QWEN, rank=4, seed=24)
    twin = bob.create_lora_training_client(base_model=QWEN, rank=4, seed=24)
    cycles = []

    def record(event):
        cycles.append(event.get("requests") or {})

    events = alice.events()
    events.subscribe(record)
    shared = False
    try:
        for attempt, d in enumerate(texts[:3]):
            fb_step(a, d)
            b.forward_backward([d], "cross_entropy").result(60)  # each pass alone
            twin.forward_backward([d], "cross_entropy").result(60)
            rewind, opt = a.rewind(1), b.optim_step(LR)  # submitted together: one cycle
            rewind.result(60)
            opt.result(60)
            twin.optim_step(LR).result(60)
            shared = shared or any(c.get("rewind") and c.get("optim_step") for c in cycles)
            if shared and attempt:
                break
    finally:
        events.unsubscribe(record)
    assert shared, "the rewind and the other tenant's optim_step never shared a cycle"
    assert_same_files(saved(b, bob, tmp_path, "bob"), saved(twin, bob, tmp_path, "twin"))
