"""The official `tinker` SDK against our server's Tinker-protocol gateway (--tinker-port).

A real server process with the tiny model; the SDK in this process talks HTTP to it, our own
client talks ZeroMQ to the same server. Every result through the gateway must equal the same
loop through our client (fp32 CPU: same seeds, same data -> same numbers).
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from conftest import free_port, start_server

tinker = pytest.importorskip("tinker")
from tinker import types as tt  # noqa: E402

import workbench as wb  # noqa: E402

KEY = "tml-gateway-test-key"  # tenant "default", used by both SDKs (one tenant's checkpoints)
OTHER_KEY = "wb-other-tenant-key"  # a second tenant, on our client only
BASE = "tiny-qwen3"
TIGHT = dict(rtol=1e-5, atol=1e-5)



@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    port = free_port()
    root = tmp_path_factory.mktemp("gw")
    (root / "keys.json").write_text(json.dumps({OTHER_KEY: "workbench-tenant"}))
    server = start_server(root, "--models", BASE, "--tinker-port", str(port),
                          "--api-keys", str(root / "keys.json"), api_key=KEY)
    os.environ.update(TINKER_BASE_URL=f"http://127.0.0.1:{port}", TINKER_API_KEY=KEY, TINKER_TELEMETRY="0")
    yield server, f"http://127.0.0.1:{port}"
    server.stop(timeout=30)


@pytest.fixture(scope="module")
def sdk(gateway):
    return tinker.ServiceClient(base_url=gateway[1], api_key=KEY)


@pytest.fixture(scope="module")
def ours(gateway):
    return wb.ServiceClient(base_url=gateway[0].url, api_key=KEY)


@pytest.fixture(scope="module")
def other(gateway):
    return wb.ServiceClient(base_url=gateway[0].url, api_key=OTHER_KEY)


def _data(n: int = 3, seed: int = 0, length: int = 7, rl: bool = False):
    """The same datums for both SDKs: (tinker datums, workbench datums)."""
    rng = np.random.default_rng(seed)
    t_data, w_data = [], []
    for _ in range(n):
        tokens = rng.integers(5, 200, size=length + 1)
        inputs = {"target_tokens": tokens[1:].astype(np.int64),
                  "weights": rng.uniform(0.5, 1.0, size=length).astype(np.float32)}
        if rl:
            inputs["logprobs"] = rng.uniform(-6.0, -4.0, size=length).astype(np.float32)
            inputs["advantages"] = rng.normal(size=length).astype(np.float32)
        t_data.append(tt.Datum(model_input=tt.ModelInput.from_ints(tokens[:-1].tolist()),
                               loss_fn_inputs={k: tt.TensorData.from_numpy(v) for k, v in inputs.items()}))
        w_data.append(wb.types.Datum(model_input=wb.types.ModelInput.from_ints(tokens[:-1].tolist()),
                                     loss_fn_inputs={k: wb.types.TensorData.from_numpy(v) for k, v in inputs.items()}))
    return t_data, w_data


def _same_output(t_out, w_out) -> None:
    assert len(t_out.loss_fn_outputs) == len(w_out.loss_fn_outputs)
    for t, w in zip(t_out.loss_fn_outputs, w_out.loss_fn_outputs):
        np.testing.assert_allclose(t["logprobs"].to_numpy(), w["logprobs"].to_numpy(), **TIGHT)
    for key, value in w_out.metrics.items():
        assert t_out.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_the_gateway_enforces_max_rank_like_the_zeromq_frontend(sdk, ours):
    """Both frontends run the same checks before queueing: --max-rank (default 128) included."""
    with pytest.raises(Exception, match="max-rank"):
        sdk.create_lora_training_client(BASE, rank=129, seed=1).result()
    with pytest.raises(Exception, match="max-rank"):
        ours.create_lora_training_client(BASE, rank=129, seed=1)


LOSSES = [
    ("cross_entropy", None), ("importance_sampling", None),
    ("ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.2}),
    ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.3}), ("dro", {"beta": 0.5}),
]


def test_training_loop_equals_our_client(sdk, ours):
    """Every loss with its config, forward, forward_backward_custom, optim_step; then
    save_state -> create_training_client_from_state_with_optimizer continues identically."""
    tc = sdk.create_lora_training_client(BASE, rank=8, seed=11).result()
    wc = ours.create_lora_training_client(BASE, rank=8, seed=11)
    assert tc.get_info().model_data.model_name == BASE
    adam = dict(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    for i, (loss, config) in enumerate(LOSSES):
        t_data, w_data = _data(seed=i, rl=loss != "cross_entropy")
        t_fut = tc.forward_backward(t_data, loss, loss_fn_config=config)  # submitted together
        t_opt = tc.optim_step(tt.AdamParams(**adam))
        w_out = wc.forward_backward(w_data, loss, loss_fn_config=config).result()
        wc.optim_step(wb.types.AdamParams(**adam)).result()
        _same_output(t_fut.result(), w_out)
        assert isinstance(t_opt.result(), tt.OptimStepResponse)

    def custom(data, logprobs):  # a loss torch computes client-side: -sum(w * logp^2)
        loss = sum((-(lp ** 2) * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs))
        return loss, {"custom:sum": float(loss.detach())}

    t_data, w_data = _data(seed=9)
    t_custom = tc.forward_backward_custom(t_data, custom).result()
    w_custom = wc.forward_backward_custom(w_data, custom).result()
    assert t_custom.metrics["custom:sum"] == pytest.approx(w_custom.metrics["custom:sum"], rel=1e-5)
    tc.optim_step(tt.AdamParams(**adam)).result()
    wc.optim_step(wb.types.AdamParams(**adam)).result()
    _same_output(tc.forward(t_data, "cross_entropy").result(), wc.forward(w_data, "cross_entropy").result())

    # State with optimizer: resumed runs on both sides take identical next steps.
    state = tc.save_state("resume").result().path
    assert state.startswith("tinker://") and state.endswith("/weights/resume")
    tc2 = sdk.create_training_client_from_state_with_optimizer(state).result()
    wc2 = ours.create_training_client_from_state_with_optimizer("wb://" + state[len("tinker://"):])
    for client in (tc2,):
        client.forward_backward(t_data, "cross_entropy")
        client.optim_step(tt.AdamParams(**adam)).result()
    wc2.forward_backward(w_data, "cross_entropy")
    wc2.optim_step(wb.types.AdamParams(**adam)).result()
    _same_output(tc2.forward(t_data, "cross_entropy").result(), wc2.forward(w_data, "cross_entropy").result())


def test_sampling_equals_our_client(sdk, ours):
    tc = sdk.create_lora_training_client(BASE, rank=4, seed=3).result()
    wc = ours.create_lora_training_client(BASE, rank=4, seed=3)
    t_data, w_data = _data(seed=5)
    tc.forward_backward(t_data, "cross_entropy")
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    wc.forward_backward(w_data, "cross_entropy")
    wc.optim_step(wb.types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_for_sampler("snap").result().path
    assert path.startswith("tinker://") and "/sampler_weights/snap" in path
    ts = sdk.create_sampling_client(model_path=path).result()
    ws = wc.save_weights_and_get_sampling_client("snap-ours")
    prompt = [11, 12, 13, 14]
    tokenizer = tc.get_tokenizer()  # tokenizer_id is a local directory, loaded offline
    stop = tokenizer.decode([55])  # a stop string; greedy decoding is steered by the seed-free argmax
    for params in ({"max_tokens": 6, "seed": 7, "temperature": 1.0}, {"max_tokens": 8, "temperature": 0.0, "stop": [stop]}):
        t_res = ts.sample(tt.ModelInput.from_ints(prompt), 3, tt.SamplingParams(**params)).result()
        w_res = ws.sample(wb.types.ModelInput.from_ints(prompt), 3, wb.types.SamplingParams(**params)).result()
        assert len(t_res.sequences) == 3
        for t, w in zip(t_res.sequences, w_res.sequences):
            assert list(t.tokens) == list(w.tokens) and t.stop_reason == w.stop_reason
            np.testing.assert_allclose(t.logprobs, w.logprobs, **TIGHT)
    t_lp = ts.compute_logprobs(tt.ModelInput.from_ints(prompt)).result()
    w_lp = ws.compute_logprobs(wb.types.ModelInput.from_ints(prompt)).result()
    assert t_lp[0] is None and w_lp[0] is None
    np.testing.assert_allclose(t_lp[1:], w_lp[1:], **TIGHT)
    # The ephemeral form: a sampler on the current weights without a named checkpoint.
    t_eph = tc.save_weights_and_get_sampling_client().result().compute_logprobs(tt.ModelInput.from_ints(prompt)).result()
    np.testing.assert_allclose(t_eph[1:], w_lp[1:], **TIGHT)
    # A checkpoint saved through the gateway is a wb:// checkpoint for our client.
    ws2 = ours.create_sampling_client(model_path="wb://" + path[len("tinker://"):])
    np.testing.assert_allclose(ws2.compute_logprobs(wb.types.ModelInput.from_ints(prompt)).result()[1:],
                               w_lp[1:], **TIGHT)


def test_chunked_batch_over_1024_datums(sdk, ours):
    """The SDK splits >1,024 datums into chunks sent in parallel, first chunk last; the
    gateway submits them in seq_id order, and the combined result equals one batch."""
    tc = sdk.create_lora_training_client(BASE, rank=4, seed=5).result()
    wc = ours.create_lora_training_client(BASE, rank=4, seed=5)
    t_data, w_data = _data(n=1030, seed=2, length=3)
    t_out = tc.forward_backward(t_data, "cross_entropy").result()
    w_out = wc.forward_backward(w_data, "cross_entropy").result()
    _same_output(t_out, w_out)
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    wc.optim_step(wb.types.AdamParams(learning_rate=1e-2)).result()
    probe_t, probe_w = _data(n=2, seed=3)
    _same_output(tc.forward(probe_t, "cross_entropy").result(), wc.forward(probe_w, "cross_entropy").result())


def test_rest_client_checkpoints(sdk):
    tc = sdk.create_lora_training_client(BASE, rank=4, seed=1, user_metadata={"renderer": "role_colon"}).result()
    state = tc.save_state("ckpt-a").result().path
    sampler = tc.save_weights_for_sampler("ckpt-b").result().path
    rest = tinker.RestClient()
    run_id = state[len("tinker://"):].split("/")[0]
    listed = rest.list_checkpoints(run_id).result().checkpoints
    assert {c.tinker_path for c in listed} == {state, sampler}
    assert {c.checkpoint_type for c in listed} == {"training", "sampler"}
    run = rest.get_training_run(tc.model_id).result()  # the SDK's model id names the run too
    assert run.training_run_id == run_id and run.user_metadata == {"renderer": "role_colon"}
    assert run.base_model == BASE and run.lora_rank == 4
    assert state in {c.tinker_path for c in rest.list_user_checkpoints(limit=100).result().checkpoints}
    assert run_id in {r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs}
    rest.delete_checkpoint_from_tinker_path(sampler).result()
    assert {c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints} == {state}


def test_failures_are_structured(sdk):
    tc = sdk.create_lora_training_client(BASE, rank=4, seed=1).result()
    bad = tt.Datum(model_input=tt.ModelInput.from_ints([1, 2, 3]),
                   loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(np.array([1, 2], dtype=np.int64))})
    with pytest.raises(tinker.RequestFailedError) as info:
        tc.forward_backward([bad], "cross_entropy").result()
    assert "data[0].loss_fn_inputs" in str(info.value)  # names what was wrong
    assert info.value.category == tt.RequestErrorCategory.User
    with pytest.raises(tinker.NotFoundError, match="run-nosuchrun00"):  # HTTP 404 with the reason
        sdk.create_sampling_client(model_path="tinker://run-nosuchrun00/sampler_weights/x").result()
    # The run keeps working after a failed request.
    t_data, _ = _data(n=1)
    assert tc.forward(t_data, "cross_entropy").result().loss_fn_outputs


def test_cookbook_style_loop_and_shared_cycles(sdk, other):
    """A tinker-cookbook-shaped SFT loop (renderer, datums, forward_backward + optim_step
    submitted together, sampler refreshed after saves) runs on the SDK while our client
    trains too; the event stream shows cycles holding both tenants' runs."""
    import zmq

    from workbench import wire
    from workbench.renderers import get_renderer

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"cycle")
    sub.connect(other.events_url)
    events: list[dict] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            if sub.poll(100):
                frames = sub.recv_multipart()
                events.append(wire.decode(frames[1:]))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()

    tc = sdk.create_lora_training_client(BASE, rank=8, seed=2, user_metadata={"renderer": "role_colon"}).result()
    renderer = get_renderer(tinker.RestClient().get_training_run(tc.model_id).result().user_metadata["renderer"],
                            tc.get_tokenizer())
    conversations = [[{"role": "user", "content": f"count to {n}"},
                      {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}] for n in (2, 3, 4)]
    datums = []
    for messages in conversations:
        model_input, weights = renderer.build_supervised_example(messages)
        tokens = model_input.to_ints()
        datums.append(tt.Datum(model_input=tt.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": tt.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "weights": tt.TensorData.from_numpy(np.asarray(weights[1:], dtype=np.float32))}))
    wc = other.create_lora_training_client(BASE, rank=8, seed=2)
    _, w_data = _data(seed=4)
    losses, sampler = [], None
    for step in range(4):
        w_fut = wc.forward_backward(w_data, "cross_entropy")  # the other tenant, same cycles
        w_opt = wc.optim_step(wb.types.AdamParams(learning_rate=1e-2))
        fwd = tc.forward_backward(datums, "cross_entropy")
        opt = tc.optim_step(tt.AdamParams(learning_rate=1e-3))
        losses.append(fwd.result().metrics["loss:sum"])
        opt.result(), w_fut.result(), w_opt.result()
        if step % 2 == 1:
            sampler = tc.save_weights_and_get_sampling_client(f"step-{step}").result()
    prompt = renderer.build_generation_prompt(conversations[0][:1]).to_ints()
    result = sampler.sample(tt.ModelInput.from_ints(prompt), 1,
                            tt.SamplingParams(max_tokens=12, temperature=0.0, stop=renderer.get_stop_sequences())).result()
    assert result.sequences[0].tokens
    assert losses[-1] < losses[0]

    def shared_cycles() -> list:
        return [e for e in list(events) if e.get("tenants", 0) >= 2 and e.get("runs", 0) >= 2
                and e.get("requests", {}).get("forward_backward", 0) >= 2]

    # Whether two frontends' requests meet in one cycle depends on arrival times (HTTP is the
    # slower path); on a loaded machine give them a few more chances, the SDK's request first.
    for _ in range(8):
        time.sleep(0.3)  # let the listener drain the events published so far
        if shared_cycles():
            break
        fwd = tc.forward_backward(datums, "cross_entropy")
        w_fut = wc.forward_backward(w_data, "cross_entropy")
        fwd.result(), w_fut.result()
    stop.set()
    listener.join()
    sub.close(0)
    shared = shared_cycles()
    assert shared, f"no cycle trained both runs together: {[(e.get('runs'), e.get('requests')) for e in events]}"


class _Events:
    """Everything of some topics of a tenant's own event stream (`service.events()`, through
    its key), collected from the stream's thread."""

    def __init__(self, service, *topics: str):
        self.seen: list[dict] = []
        self._stream = service.events(topics)
        self._stream.subscribe(self.seen.append)

    def of(self, session: str) -> list[dict]:
        return [e for e in list(self.seen) if e.get("topic") == "session" and e["session"] == session]

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self._stream.unsubscribe(self.seen.append)


def test_silent_sessions_of_both_frontends_are_parked_by_one_book_and_come_back(tmp_path):
    """--session-timeout 1.5: a Tinker-SDK session kept alive by heartbeats stays live; once
    silent, its run and its sampler are parked (as is a closed ZeroMQ client's, by the same
    sweep); its next requests unpark them and give the same numbers; finish parks at once
    and later heartbeats get 410. Cycle events carry the queue depth per tenant."""
    import httpx

    port = free_port()
    server = start_server(tmp_path, "--models", BASE, "--tinker-port", str(port), "--session-timeout", "1.5",
                          api_key=KEY)
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": KEY}
    sdk = tinker.ServiceClient(base_url=url, api_key=KEY)
    ours = wb.ServiceClient(base_url=server.url, api_key=KEY)
    events = _Events(ours, "session", "cycle")
    try:
        tc = sdk.create_lora_training_client(BASE, rank=4, seed=21).result()
        session = tc.model_id.rsplit(":train:", 1)[0]  # the SDK's model ids are <session>:train:<n>
        run_id = tinker.RestClient(base_url=url, api_key=KEY).get_training_run(tc.model_id).result().training_run_id
        t_data, _ = _data(n=2, seed=6)
        tc.forward_backward(t_data, "cross_entropy")
        tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
        ts = tc.save_weights_and_get_sampling_client().result()  # ephemeral: joins the model's session
        named = sdk.create_sampling_client(model_path=tc.save_weights_for_sampler("snap").result().path).result()
        prompt = tt.ModelInput.from_ints([11, 12, 13, 14])
        before, lp_before = tc.forward(t_data, "cross_entropy").result(), ts.compute_logprobs(prompt).result()
        # The ZeroMQ side: a client with a run and a sampler that closes (stops heartbeating).
        wc = ours.create_lora_training_client(BASE, rank=4, seed=22)
        ws = wc.save_weights_and_get_sampling_client("ours")
        ours.close()
        for _ in range(6):  # heartbeats keep the SDK's session alive past the timeout
            time.sleep(0.5)
            assert httpx.post(f"{url}/api/v1/session_heartbeat", json={"session_id": session},
                              headers=headers).json() == {"type": "session_heartbeat"}
        assert events.of(session) == []
        # ... silence parks it, with its sampler; the closed ZeroMQ client's too.
        assert events.wait(lambda: events.of(session) and events.of(ours.session_id), timeout=6), events.seen
        parked = events.of(session)[0]
        assert (parked["state"], parked["reason"], parked["runs"]) == ("parked", "silent", [run_id])
        assert len(parked["samplers"]) == 2 and all(s.startswith("sampler-") for s in parked["samplers"])
        assert events.of(ours.session_id)[0]["runs"] == [wc.model_id]
        assert events.of(ours.session_id)[0]["samplers"] == [ws.sampler_id]
        # Its next requests unpark it first, and the numbers are unchanged.
        after = tc.forward(t_data, "cross_entropy").result()
        for a, b in zip(after.loss_fn_outputs, before.loss_fn_outputs):
            np.testing.assert_array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())
        assert ts.compute_logprobs(prompt).result() == lp_before
        assert named.compute_logprobs(prompt).result() == lp_before  # the same weights
        assert [e["state"] for e in events.of(session)] == ["parked", "resumed"]
        # finish (the SDK's close) parks at once; the session's heartbeats are then refused.
        sdk.close("success").result()
        assert events.wait(lambda: len(events.of(session)) == 3, timeout=1.0), events.of(session)
        assert events.of(session)[2]["reason"] == "finished"
        gone = httpx.post(f"{url}/api/v1/session_heartbeat", json={"session_id": session}, headers=headers)
        assert gone.status_code == 410 and "finished" in gone.json()["detail"]
        cycles = [e for e in list(events.seen) if e.get("topic") == "cycle"]
        assert cycles and all(sum(e["queue_depth_by_tenant"].values()) == e["queue_depth"] for e in cycles)
    finally:
        events.close()
        server.stop(timeout=30)
