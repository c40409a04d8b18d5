"""The client SDK end to end: RestClient, submission order, listeners, pickling into a
subprocess, Datum conversion. A real server process (two tenants), real ZeroMQ, tiny-qwen3."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import types
from workbench.errors import InvalidRequestError, NotFoundError

from conftest import start_server

BASE = "tiny-qwen3"


def rand_datum(rng, n: int, weights=None) -> types.Datum:
    tokens = rng.integers(5, 3000, n + 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(n) if weights is None else weights},
    )


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory):
    root = tmp_path_factory.mktemp("client_api")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"other-key": "other"}))
    running = start_server(root, "--models", BASE, "--api-keys", str(keys))
    yield running
    running.stop(timeout=30)


@pytest.fixture(scope="module")
def service(two_tenants):
    return wb.ServiceClient(base_url=two_tenants.url, api_key=two_tenants.api_key)


# --------------------------------------------------------------------------- RestClient


def test_rest_list_download_delete(service, two_tenants, tmp_path):
    import peft
    from server.tiny import build_tiny_model

    rng = np.random.default_rng(0)
    training = service.create_lora_training_client(BASE, rank=4, seed=3, user_metadata={"who": "test"})
    data = [rand_datum(rng, n) for n in (9, 6)]
    for _ in range(2):  # train, so lora_B != 0 and the download is a real check
        training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    state = training.save_state("st").result(60).path
    weights = training.save_weights_for_sampler("sw").result(60).path
    rest = service.create_rest_client()

    runs = rest.list_training_runs(limit=50).result(30)
    run = next(r for r in runs.training_runs if r.training_run_id == training.model_id)
    assert (run.base_model, run.lora_rank, run.user_metadata) == (BASE, 4, {"who": "test"})
    assert run.last_checkpoint.path == state and run.last_sampler_checkpoint.path == weights
    assert runs.cursor.total_count >= 1 and runs.cursor.limit == 50
    assert rest.get_training_run(training.model_id).result(30) == run
    assert rest.get_training_run_by_tinker_path(weights).result(30) == run

    listed = rest.list_checkpoints(training.model_id).result(30).checkpoints
    assert {(c.checkpoint_id, c.checkpoint_type, c.path) for c in listed} == {
        ("weights/st", "training", state), ("sampler_weights/sw", "sampler", weights)}
    mine = rest.list_user_checkpoints(limit=100).result(30)
    assert {state, weights} <= {c.path for c in mine.checkpoints}

    # The state download is a PEFT directory plus the optimizer; the adapter reproduces
    # the server's logprobs when loaded with plain PEFT on a fresh base.
    out = rest.download_checkpoint(state, tmp_path / "state").result(30)
    assert {p.name for p in (tmp_path / "state").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"}
    rest.download_checkpoint(weights, tmp_path / "sw").result(30)
    assert {p.name for p in (tmp_path / "sw").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    model = peft.PeftModel.from_pretrained(build_tiny_model(BASE), out).eval()
    evals = [rand_datum(rng, n) for n in (7, 12)]
    served = training.forward(evals, "cross_entropy").result(60)
    with torch.no_grad():
        for datum, got in zip(evals, served.loss_fn_outputs):
            ids = torch.tensor(datum.model_input.to_ints())[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].data)
            ref = logp.gather(-1, targets[:, None])[:, 0].numpy()
            np.testing.assert_allclose(got["logprobs"].to_numpy(), ref, atol=1e-5, rtol=0)

    # Another tenant sees none of it.
    other = wb.ServiceClient(base_url=two_tenants.url, api_key="other-key").create_rest_client()
    assert training.model_id not in {r.training_run_id for r in other.list_training_runs().result(30).training_runs}
    for call in (lambda: other.get_training_run(training.model_id), lambda: other.list_checkpoints(training.model_id),
                 lambda: other.download_checkpoint(state, tmp_path / "x"),
                 lambda: other.delete_checkpoint_from_tinker_path(weights)):
        with pytest.raises(NotFoundError, match="not found"):
            call().result(30)

    # Delete: gone from the listing, and every later load is NotFound.
    rest.delete_checkpoint(training.model_id, "sampler_weights/sw").result(30)
    rest.delete_checkpoint_from_tinker_path(state).result(30)
    assert rest.list_checkpoints(training.model_id).result(30).checkpoints == []
    with pytest.raises(NotFoundError, match="not found"):
        service.create_sampling_client(model_path=weights)
    with pytest.raises(NotFoundError, match="not found"):
        training.load_state(state).result(30)
    with pytest.raises(NotFoundError, match="not found"):
        rest.download_checkpoint(weights, tmp_path / "gone").result(30)
    with pytest.raises(ValueError, match="wb://<run_id>/weights/<name>"):
        rest.delete_checkpoint_from_tinker_path("tinker://x/weights/y")


# -------------------------------------------------------------- order and listeners


def test_submission_order_preserved_end_to_end(service):
    """Seven requests submitted back to back, never waited on in between, give exactly the
    results of the same requests run one at a time, in submission order."""
    rng = np.random.default_rng(1)
    data = [rand_datum(rng, n) for n in (8, 5)]
    adam = types.AdamParams(learning_rate=2e-3)
    script = [("forward", data), ("forward_backward", data), ("optim_step", adam),
              ("forward", data), ("forward_backward", data), ("optim_step", adam), ("forward", data)]

    def submit(client, op, arg):
        return client.optim_step(arg) if op == "optim_step" else getattr(client, op)(arg, "cross_entropy")

    def losses(results):
        return [r.metrics.get("loss:sum") if op != "optim_step" else None for (op, _), r in zip(script, results)]

    burst = service.create_lora_training_client(BASE, rank=4, seed=7)
    finished: list[int] = []
    futures = []
    for i, (op, arg) in enumerate(script):
        futures.append(submit(burst, op, arg))
        futures[-1].add_done_callback(lambda _, i=i: finished.append(i))
    burst_results = [f.result(120) for f in futures]

    stepwise = service.create_lora_training_client(BASE, rank=4, seed=7)
    step_results = [submit(stepwise, op, arg).result(120) for op, arg in script]
    # An optim_step is a barrier: everything submitted before it has resolved before it, and
    # nothing submitted after it resolves before it. (Within a cycle a forward may be answered
    # after a forward_backward submitted behind it: both see the same weights.)
    for step in (i for i, (op, _) in enumerate(script) if op == "optim_step"):
        at = finished.index(step)
        assert sorted(finished[:at]) == list(range(step)), finished
    assert losses(burst_results) == losses(step_results)
    forwards = [r.metrics["loss:sum"] for (op, _), r in zip(script, burst_results) if op == "forward"]
    assert forwards[0] > forwards[1] > forwards[2]  # each optim_step took effect in order


def test_trainable_parameters_come_with_the_run(service):
    """The server counts a run's LoRA entries at creation: rank x (in + out) summed over the
    adapted layers, so linear in rank and additive over the attn / mlp / unembed groups."""
    def count(rank=4, **groups):
        return service.create_lora_training_client(BASE, rank=rank, seed=0, **groups).trainable_parameters

    full = count()
    assert full > 0 and count(rank=8) == 2 * full
    only = dict(train_attn=False, train_mlp=False, train_unembed=False)
    assert sum(count(**{**only, g: True}) for g in only) == full
    saved = service.create_lora_training_client(BASE, rank=4, seed=0).save_state("count").result(60).path
    assert service.create_training_client_from_state(saved).trainable_parameters == full


def test_listeners_see_step_kind_metrics(service):
    rng = np.random.default_rng(2)
    data = [rand_datum(rng, 6)]
    training = service.create_lora_training_client(BASE, rank=4, seed=1)
    seen: list = []
    training.add_listener(lambda step, kind, metrics: seen.append((step, kind, metrics)))
    for _ in range(2):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-3))
    training.forward(data, "cross_entropy").result(60)
    assert [(s, k) for s, k, _ in seen] == [
        (0, "forward_backward"), (1, "optim_step"), (1, "forward_backward"), (2, "optim_step"), (2, "forward")]
    assert all("loss:sum" in m for _, k, m in seen if k != "optim_step")
    assert all(m for _, k, m in seen if k == "optim_step")  # the server's step metrics

    # forward_backward_custom reports once, with the custom loss's own metrics (not its
    # probe forward nor the surrogate cross_entropy).
    seen.clear()

    def custom(data, logprobs):
        loss = -2.0 * sum(lp.sum() for lp in logprobs)
        return loss, {"margin:mean": 0.5}

    out = training.forward_backward_custom(data, custom).result(60)
    assert [(s, k) for s, k, _ in seen] == [(2, "forward_backward")]
    assert seen[0][2] == out.metrics and seen[0][2]["margin:mean"] == 0.5
    assert seen[0][2]["loss:sum"] == pytest.approx(-2.0 * float(np.sum(out.loss_fn_outputs[0]["logprobs"].to_numpy())), rel=1e-5)

    sampler = training.save_weights_and_get_sampling_client("listened")
    got: list = []
    sampler.add_listener(lambda step, kind, metrics: got.append((step, kind, metrics)))
    prompt = types.ModelInput.from_ints([5, 6, 7])
    res = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=4, seed=0)).result(60)
    lps = sampler.compute_logprobs(prompt).result(60)
    assert [(s, k) for s, k, _ in got] == [(1, "sample"), (2, "compute_logprobs")]
    assert got[0][2]["num_sequences"] == 3
    assert got[0][2]["tokens:sum"] == sum(len(s.tokens) for s in res.sequences)
    assert got[1][2]["logprob:sum"] == pytest.approx(sum(lps[1:]))


# ---------------------------------------------------------------------- pickling

_CHILD = """
import pickle, sys
from workbench import types
sampler = pickle.loads(sys.stdin.buffer.read())
res = sampler.sample(types.ModelInput.from_ints([5, 6, 7, 8]), 2,
                     types.SamplingParams(max_tokens=6, seed=123, temperature=1.0)).result(120)
print([s.tokens for s in res.sequences])
"""


def test_pickled_sampler_samples_in_a_subprocess(service):
    sampler = service.create_lora_training_client(BASE, rank=4, seed=2).save_weights_and_get_sampling_client("pk")
    blob = pickle.dumps(sampler)
    assert len(blob) < 1000  # URL, key and sampler id, nothing else
    child = subprocess.run([sys.executable, "-c", _CHILD], input=blob, capture_output=True, timeout=180)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    mine = sampler.sample(types.ModelInput.from_ints([5, 6, 7, 8]), 2,
                          types.SamplingParams(max_tokens=6, seed=123, temperature=1.0)).result(60)
    assert child.stdout.decode().strip() == str([s.tokens for s in mine.sequences])


# ---------------------------------------------------------------- Datum conversion


def test_datum_converts_lists_numpy_and_torch_like_tinker():
    for make in (list, np.asarray, torch.tensor):
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": make([2, 3, 4]), "weights": make([1, 0, 1]),
                            "advantages": make([0.5, -1.0, 2.0]), "logprobs": make([-1.0, -2.0, -0.5])},
        )
        dtypes = {k: v.dtype for k, v in datum.loss_fn_inputs.items()}
        assert dtypes == {"target_tokens": "int64", "weights": "float32",
                          "advantages": "float32", "logprobs": "float32"}, make
        assert datum.loss_fn_inputs["target_tokens"].to_numpy().dtype == np.int64
        assert datum.loss_fn_inputs["weights"].to_torch().dtype == torch.float32
        assert datum.loss_fn_inputs["weights"].tolist() == [1.0, 0.0, 1.0]
    # float target_tokens (from a float tensor) become int64; bfloat16 weights become float32
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                        loss_fn_inputs={"target_tokens": torch.tensor([2.0, 3.0]),
                                        "weights": torch.tensor([1.0, 0.5], dtype=torch.bfloat16)})
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 3]
    assert datum.loss_fn_inputs["weights"].dtype == "float32"
    with pytest.raises(ValueError, match="weights"):
        types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": ["a"]})


def test_invalid_datum_is_caught_before_sending(service, monkeypatch):
    training = service.create_lora_training_client(BASE, rank=4, seed=0)
    sent: list[str] = []
    real_call = training._connection.call
    monkeypatch.setattr(training._connection, "call", lambda op, args: sent.append(op) or real_call(op, args))
    ok = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                     loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, 1, 1]})
    short = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, 1]})
    nan = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, np.nan, 1]})
    rl = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                     loss_fn_inputs={"target_tokens": [2, 3, 4], "logprobs": [-1, -1, -1],
                                     "advantages": [0, np.inf, 1]})
    cases = [
        ([ok, short], "cross_entropy", "data[1].loss_fn_inputs.weights", "shape \\[2\\], expected \\[3\\]"),
        ([ok, ok, nan], "cross_entropy", "data[2].loss_fn_inputs.weights", "NaN or inf .*position 1"),
        ([ok, rl], "importance_sampling", "data[0].loss_fn_inputs.logprobs", "importance_sampling needs"),
        ([rl], "ppo", "data[0].loss_fn_inputs.advantages", "NaN or inf"),
        ([ok], "cross_entropy_typo", "loss_fn", "unknown loss_fn 'cross_entropy_typo'; choose one of cross_entropy"),
    ]
    for data, loss_fn, where, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as err:
            training.forward_backward(data, loss_fn).result(1)  # fails at once, without a reply
        assert err.value.where == where and err.value.category == "user"
    assert sent == []  # nothing went on the wire
    # What only the model can tell is checked by the server, with the same precision.
    big = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10**6]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, 1, 1]})
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as err:
        training.forward_backward([ok, big], "cross_entropy").result(60)
    assert err.value.where == "data[1].model_input"
