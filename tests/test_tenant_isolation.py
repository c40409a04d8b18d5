"""Numeric isolation in the engine: whatever one adapter holds or is fed (NaN weights,
overflowing weights or loss weights, an overflowing learning rate), its neighbours in the
same packed row get exactly what they get alone, and no step can leave an adapter
non-finite. Each scenario first shows that the leak is real without the guard."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine_helpers import QWEN, adapter_maker, grads, random_datum
from server.engine.engine import AdapterConfig, Engine, EngineDatum, EngineInputError, ForwardItem
from server.engine.packing import PassSequence, plan_micro_batches

make_adapter = adapter_maker("iso", 7)


@pytest.fixture()
def engine():
    # Long rows, so that short sequences of different adapters share one row.
    return Engine(device="cpu", row_length=64, lora_impl="loop")


def poison(adapter, value: float) -> None:
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.lora_B.fill_(value)


def items_sharing_a_row(engine, bad_id, good_id, bad_datum=None, seed=0):
    rng = np.random.default_rng(seed)
    bad = ForwardItem(bad_id, [bad_datum or random_datum(rng, 7)])
    good = ForwardItem(good_id, [random_datum(rng, 9), random_datum(rng, 5)])
    slots = [engine.adapters[bad_id].slot] + [engine.adapters[good_id].slot] * 2
    lengths = [len(bad.data[0].tokens), 9, 5]
    plan = plan_micro_batches(lengths, slots, engine.token_budget, engine.row_length)
    assert any(0 in row and (1 in row or 2 in row) for rows in plan for row in rows), plan
    return bad, good


def alone(engine, good, backward):
    """The good item's results and gradients when it runs by itself."""
    adapter = engine.adapters[good.adapter_id]
    adapter.optimizer.zero_grad()
    result = engine.forward([good], backward=backward)[0]
    return result, grads(adapter) if backward else None


def leaked_without_the_guard(engine, bad, good, backward) -> bool:
    """Runs the shared micro-batch with isolation off: True when the good adapter's
    logprobs or gradients come out non-finite (the leak the guard exists for)."""
    seqs = [PassSequence(k, d, datum.tokens, engine.adapters[it.adapter_id].slot)
            for k, it in enumerate((bad, good)) for d, datum in enumerate(it.data)]
    logprobs, losses = [[None], [None, None]], [0.0, 0.0]
    engine.adapters[good.adapter_id].optimizer.zero_grad()
    engine._micro_batch(engine.bases[QWEN], [bad, good], seqs, [[0, 1, 2]], backward, logprobs, losses,
                        isolate=False)
    good_params = engine.adapters[good.adapter_id].parameters()
    finite_grads = all(p.grad is None or torch.isfinite(p.grad).all() for p in good_params)
    engine.adapters[good.adapter_id].optimizer.zero_grad()
    engine.adapters[bad.adapter_id].optimizer.zero_grad()
    return not (np.isfinite(logprobs[1][0]).all() and np.isfinite(logprobs[1][1]).all() and finite_grads)


@pytest.mark.parametrize("backward", [True, False])
@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_a_diverged_neighbour_in_the_same_row_changes_nothing(engine, backward, value):
    bad_id, bad_adapter = make_adapter(engine, rank=4, seed=1)
    good_id, _ = make_adapter(engine, rank=4, seed=2)
    bad, good = items_sharing_a_row(engine, bad_id, good_id)
    want = alone(engine, good, backward)
    poison(bad_adapter, value)
    assert leaked_without_the_guard(engine, bad, good, backward)

    engine.adapters[good_id].optimizer.zero_grad()
    results = engine.forward([bad, good], backward=backward)
    assert not np.isfinite(results[0].logprobs[0]).all()  # the diverged adapter's own outcome
    got_good = results[1]
    assert got_good.metrics["loss:sum"] == pytest.approx(want[0].metrics["loss:sum"], rel=1e-5)
    for got, ref in zip(got_good.logprobs, want[0].logprobs):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    if backward:
        for got, ref in zip(grads(engine.adapters[good_id]), want[1]):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_overflowing_loss_weights_do_not_reach_the_neighbours_gradients(engine):
    bad_id, _ = make_adapter(engine, rank=4, seed=3)
    good_id, _ = make_adapter(engine, rank=4, seed=4)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 4000, 8)
    huge = EngineDatum(tokens[:-1].copy(), {"target_tokens": tokens[1:].copy(),
                                            "weights": np.full(7, 3e38, np.float32)})
    bad, good = items_sharing_a_row(engine, bad_id, good_id, bad_datum=huge)
    want = alone(engine, good, backward=True)
    assert leaked_without_the_guard(engine, bad, good, backward=True)
    engine.adapters[good_id].optimizer.zero_grad()
    results = engine.forward([bad, good], backward=True)
    assert results[1].metrics["loss:sum"] == pytest.approx(want[0].metrics["loss:sum"], rel=1e-5)
    for got, ref in zip(grads(engine.adapters[good_id]), want[1]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_prompt_logprobs_beside_a_diverged_sampler_adapter(engine):
    bad_id, bad_adapter = make_adapter(engine, rank=4, seed=6)
    prompt = np.random.default_rng(6).integers(0, 4000, 12)
    want = engine.prompt_logprobs(QWEN, [(None, prompt)])[0]
    poison(bad_adapter, float("nan"))
    got = engine.prompt_logprobs(QWEN, [(bad_id, prompt[:6]), (None, prompt)])
    np.testing.assert_allclose(np.array(got[1][1:]), np.array(want[1:]), rtol=0, atol=1e-5)


def _adapter_state(adapter):
    state = adapter.optimizer.optimizer.state
    return [t.detach().clone() for p in adapter.parameters()
            for t in (p, *(state[p].values() if p in state else ()))]


def _trained_once(engine, seed):
    adapter_id, adapter = make_adapter(engine, rank=4, seed=seed)
    rng = np.random.default_rng(seed)
    engine.forward([ForwardItem(adapter_id, [random_datum(rng, 8)])], backward=True)
    engine.optim_step(adapter_id, dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                       weight_decay=0.0, grad_clip_norm=0.0))
    engine.forward([ForwardItem(adapter_id, [random_datum(rng, 8)])], backward=True)
    return adapter_id, adapter


ADAM = dict(beta1=0.9, beta2=0.95, eps=1e-8, grad_clip_norm=0.0)


@pytest.mark.parametrize("how", ["overflowing lr", "overflowing weight decay", "nan gradients"])
def test_a_step_that_would_make_an_adapter_non_finite_is_refused_and_changes_nothing(engine, how):
    adapter_id, adapter = _trained_once(engine, seed=11)
    other_id, other = _trained_once(engine, seed=12)
    adam = {"overflowing lr": dict(learning_rate=3e38, weight_decay=0.0),
            "overflowing weight decay": dict(learning_rate=1.0, weight_decay=1e39),
            "nan gradients": dict(learning_rate=1e-3, weight_decay=0.0)}[how]
    if how == "nan gradients":
        next(iter(adapter.parameters())).grad[0, 0] = float("nan")
    before, steps = _adapter_state(adapter), adapter.optimizer.steps
    results = engine.optim_steps([(adapter_id, {**ADAM, **adam}),
                                  (other_id, {**ADAM, "learning_rate": 1e-3, "weight_decay": 0.0})])
    assert isinstance(results[0], EngineInputError) and "optim_step refused" in str(results[0])
    assert isinstance(results[1], dict)  # the other adapter of the same call stepped
    for got, want in zip(_adapter_state(adapter), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=False)
    assert adapter.optimizer.steps == steps
    assert all(p.grad is None for p in adapter.parameters())  # discarded: the run goes on
    rng = np.random.default_rng(13)
    engine.forward([ForwardItem(adapter_id, [random_datum(rng, 8)])], backward=True)
    assert engine.optim_step(adapter_id, {**ADAM, "learning_rate": 1e-3, "weight_decay": 0.0})["step:max"] == steps + 1


# ------------------------------------------------------- the same, through a real server

import threading  # noqa: E402

import workbench as wb  # noqa: E402
from conftest import RawClient, start_server, start_tenants_server  # noqa: E402
from workbench import types  # noqa: E402
from workbench.errors import InvalidRequestError, NotFoundError  # noqa: E402

KEYS = {"key-a": "alice", "key-b": "bob"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A fixed 400 ms clock: requests submitted together share a cycle, hence packed passes.
    running = start_tenants_server(tmp_path_factory.mktemp("isolation"), KEYS, "--cycle-ms", "400",
                                   "--max-runs-per-tenant", "3", "--max-samples", "64")
    yield running
    running.stop(timeout=30)


@pytest.fixture(scope="module")
def alice(server):
    return wb.ServiceClient(base_url=server.url, api_key="key-a")


@pytest.fixture(scope="module")
def bob(server):
    return wb.ServiceClient(base_url=server.url, api_key="key-b")


def _datum(tokens) -> types.Datum:
    tokens = [int(t) for t in tokens]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def test_a_diverged_tenant_leaves_its_co_packed_neighbour_exact(alice, bob):
    rng = np.random.default_rng(0)
    # Rows are as long as the longest sequence (17): bob's 9-token and alice's 8-token
    # sequences share the second row.
    bob_data = [_datum(rng.integers(0, 4000, 17)), _datum(rng.integers(0, 4000, 9))]
    alice_data = [_datum(rng.integers(0, 4000, 9))]
    a = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=0)
    b = bob.create_lora_training_client(base_model=QWEN, rank=4, seed=1)
    reference = b.forward(bob_data, "cross_entropy").result(60)

    a.forward_backward(alice_data, "cross_entropy").result(60)
    a.optim_step(types.AdamParams(learning_rate=1e30)).result(60)  # finite, so accepted: A diverges
    a_out, b_out = a.forward_backward(alice_data, "cross_entropy"), b.forward_backward(bob_data, "cross_entropy")
    a_out, b_out = a_out.result(60), b_out.result(60)
    assert not np.isfinite(a_out.metrics["loss:sum"])
    assert b_out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    for got, want in zip(b_out.loss_fn_outputs, reference.loss_fn_outputs):
        np.testing.assert_allclose(got["logprobs"].to_numpy(), want["logprobs"].to_numpy(), rtol=0, atol=1e-5)

    with pytest.raises(InvalidRequestError, match="optim_step refused"):
        a.optim_step(types.AdamParams(learning_rate=1e-3)).result(60)
    assert b.optim_step(types.AdamParams(learning_rate=1e-3)).result(60).metrics["step:max"] == 1
    after = b.forward(bob_data, "cross_entropy").result(60)
    assert np.isfinite(after.metrics["loss:sum"])


def test_a_malformed_request_fails_alone_in_its_cycle(alice, bob):
    b = bob.create_lora_training_client(base_model=QWEN, rank=4, seed=2)
    a_run = alice.create_lora_training_client(base_model=QWEN, rank=4, seed=3)
    raw = RawClient(alice.base_url, "key-a")
    try:
        data = [{"tokens": np.arange(10, dtype=np.int32).reshape(2, 5),
                 "loss_fn_inputs": {"target_tokens": np.arange(2), "weights": np.ones(2, np.float32)}}]
        replies = {}
        caller = threading.Thread(target=lambda: replies.setdefault("raw", raw.call(
            "forward_backward", {"model_id": a_run.model_id, "data": data, "loss_fn": "cross_entropy"})))
        caller.start()
        good = b.forward_backward([_datum(np.arange(1, 12))], "cross_entropy")
        caller.join(60)
        assert np.isfinite(good.result(60).metrics["loss:sum"])
        error = replies["raw"]["error"]
        assert error["type"] == "InvalidRequestError" and error["where"] == "data[0].model_input"
        assert "1-D" in error["message"]
    finally:
        raw.close()


def test_a_million_samples_are_refused_and_the_neighbour_is_served(alice, bob):
    sampler = alice.create_sampling_client(base_model=QWEN)
    other = bob.create_sampling_client(base_model=QWEN)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    huge = sampler.sample(prompt, 1_000_000, types.SamplingParams(max_tokens=8))
    fine = other.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=0))
    with pytest.raises(InvalidRequestError, match=r"--max-samples"):
        huge.result(60)
    assert len(fine.result(60).sequences) == 2


def test_live_runs_per_tenant_are_capped_and_unload_model_frees_one(alice, bob):
    live = []
    with pytest.raises(InvalidRequestError, match="--max-runs-per-tenant 3"):
        for seed in range(4):  # earlier tests of this module left runs of alice's too
            live.append(alice.create_lora_training_client(base_model=QWEN, rank=4, seed=seed))
    bob.create_lora_training_client(base_model=QWEN, rank=4, seed=9)  # the cap is per tenant
    victim = live[-1] if live else None
    assert victim is not None
    path = victim.save_state("before-unload").result(60).path
    victim.unload_model().result(60)
    with pytest.raises(NotFoundError):
        victim.forward([_datum(np.arange(1, 6))], "cross_entropy").result(60)
    resumed = alice.create_training_client_from_state(path)  # room again, and its checkpoints stayed
    assert np.isfinite(resumed.forward([_datum(np.arange(1, 6))], "cross_entropy").result(60).metrics["loss:sum"])


# ------------------------------------------------ parked adapters spill to disk

def _train_steps(engine, adapter_id, rng, steps, park_between):
    losses = []
    for _ in range(steps):
        out = engine.forward([ForwardItem(adapter_id, [random_datum(rng, 8)])], backward=True)[0]
        losses.append(out.metrics["loss:sum"])
        if park_between:
            engine.park(adapter_id)  # gradients accumulated but not yet stepped spill too
        engine.optim_step(adapter_id, {**ADAM, "learning_rate": 1e-3, "weight_decay": 0.1})
        if park_between:
            engine.park(adapter_id)
    return losses


def test_parked_adapters_beyond_the_host_limit_spill_to_disk_and_come_back_exactly(tmp_path):
    plain = Engine(device="cpu", lora_impl="loop")
    spilling = Engine(device="cpu", lora_impl="loop", max_host_adapters=0, spill_dir=str(tmp_path))
    for engine in (plain, spilling):
        engine.create_adapter("run", QWEN, AdapterConfig(rank=4, seed=3))
    want = _train_steps(plain, "run", np.random.default_rng(0), 3, park_between=False)
    spilling.park("run")
    adapter = spilling.adapters["run"]
    assert all(p.numel() == 0 for p in adapter.parameters())  # its memory is free
    assert (tmp_path / "run.safetensors").exists() and spilling.spill_count == 1
    got = _train_steps(spilling, "run", np.random.default_rng(0), 3, park_between=True)
    assert got == want  # bitwise: the same state came back every time
    spilling._use(["run"])
    for a, b in zip(plain.adapters["run"].state_tensors().values(), spilling.adapters["run"].state_tensors().values()):
        assert torch.equal(a, b)
    spilling.remove_adapter("run")
    assert not list(tmp_path.iterdir())


def test_a_silent_sessions_run_spills_to_disk_and_resumes_exactly(tmp_path):
    """Parking frees host memory too: with --max-host-adapters 0 a silent session's run is
    written to the store's spill directory, and its next request reads it back."""
    served = start_server(tmp_path, "--models", QWEN, "--session-timeout", "1", "--max-host-adapters", "0")
    raw = RawClient(served.url, served.api_key)
    try:
        run_id = raw.call("create_model", {"base_model": QWEN, "rank": 4, "seed": 0})["result"]["model_id"]
        data = [{"tokens": np.arange(1, 9, dtype=np.int32),
                 "loss_fn_inputs": {"target_tokens": np.arange(2, 10), "weights": np.ones(8, np.float32)}}]
        first = raw.call("forward", {"model_id": run_id, "data": data, "loss_fn": "cross_entropy"})["result"]
        spill = tmp_path / "store" / ".spill" / f"{run_id}.safetensors"
        deadline = time.monotonic() + 20
        while not spill.exists() and time.monotonic() < deadline:  # silent for 1 s: parked, spilled
            time.sleep(0.2)
        assert spill.exists()
        again = raw.call("forward", {"model_id": run_id, "data": data, "loss_fn": "cross_entropy"})["result"]
        assert again["metrics"] == first["metrics"]
        np.testing.assert_array_equal(again["loss_fn_outputs"][0]["logprobs"], first["loss_fn_outputs"][0]["logprobs"])
        assert not spill.exists()
    finally:
        raw.close()
        served.stop(timeout=30)


def test_checkpoint_samplers_beyond_the_limit_are_let_go_between_cycles_and_read_again(tmp_path):
    from server.runs import Runs
    from server.store import Store

    engine = Engine(device="cpu")
    runs = Runs(engine, Store(tmp_path / "store"), max_runs_per_tenant=1)
    run_id = runs.create_model("t", {"base_model": QWEN, "rank": 4, "seed": 0})["model_id"]
    path = runs.save(runs.runs[run_id], "s", with_optimizer=False)
    first = runs.create_sampler("t", {"model_path": path})["sampler_id"]
    second = runs.create_sampler("t", {"model_path": path})["sampler_id"]
    other = runs.create_sampler("u", {"base_model": QWEN})["sampler_id"]  # no adapter: not counted
    assert {first, second} <= set(engine.adapters)  # nothing is let go inside a cycle
    runs.release_excess_samplers()
    assert first not in engine.adapters and second in engine.adapters  # the least recently used went
    prompt = np.arange(1, 9)
    reloaded = runs.sampler(first, "t")  # read from its checkpoint again on use
    want = engine.prompt_logprobs(QWEN, [(second, prompt)])[0]
    got = engine.prompt_logprobs(QWEN, [(reloaded.adapter_id, prompt)])[0]
    assert got == want
    runs.release_excess_samplers()
    assert second not in engine.adapters and first in engine.adapters
    assert runs.sampler(other, "u").adapter_id is None
