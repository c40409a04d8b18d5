"""End to end over real ZeroMQ: a real server process, the real SDK, the tiny model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

import workbench as wb
from workbench import types, wire

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "12 + 7 = 19",
    "reverse: abc -> cba",
]


def make_datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1)},
    )


@pytest.fixture(scope="module")
def tokenizer(service):
    return service.create_sampling_client(base_model="tiny-qwen3").get_tokenizer()


def test_train_until_loss_halves_then_sample(service, tokenizer):
    training = service.create_lora_training_client(base_model="tiny-qwen3", rank=8, seed=0)
    data = [make_datum(tokenizer, t) for t in TEXTS]
    losses = []
    for _ in range(40):
        fb = training.forward_backward(data, "cross_entropy")
        op = training.optim_step(types.AdamParams(learning_rate=3e-3))  # before waiting
        out = fb.result(timeout=60)
        op.result(timeout=60)
        losses.append(out.metrics["loss:sum"])
        assert len(out.loss_fn_outputs) == len(data)
        for datum, o in zip(data, out.loss_fn_outputs):
            assert o["logprobs"].to_numpy().shape == (datum.model_input.length,)
        if losses[-1] < losses[0] / 2:
            break
    assert losses[-1] < losses[0] / 2, losses

    sampler = training.save_weights_and_get_sampling_client("s1")
    prompt = types.ModelInput.from_ints(tokenizer.encode("The quick"))
    res = sampler.sample(prompt=prompt, num_samples=2,
                         sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0)).result(60)
    assert len(res.sequences) == 2
    for seq in res.sequences:
        assert 1 <= len(seq.tokens) <= 8
        assert len(seq.tokens) == len(seq.logprobs)
        assert all(lp <= 0 for lp in seq.logprobs)
    assert res.sequences[0].tokens == res.sequences[1].tokens  # greedy


def test_fb_and_optim_submitted_together_share_a_cycle(server, service, tokenizer):
    events_url = service.server_info["events_url"]
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"cycle")
    sub.connect(events_url)
    training = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=1)
    data = [make_datum(tokenizer, TEXTS[0])]
    import time
    time.sleep(0.5)  # PUB/SUB slow joiner: let the subscription reach the server
    fb = training.forward_backward(data, "cross_entropy")
    op = training.optim_step(types.AdamParams(learning_rate=1e-3))
    fb.result(60)
    op.result(60)
    seen = []
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    while poller.poll(2000):
        topic, *frames = sub.recv_multipart()
        seen.append(wire.decode(frames))
    sub.close(0)
    both = [e for e in seen if e["requests"].get("forward_backward") and e["requests"].get("optim_step")]
    assert both, seen
    assert both[0]["tokens"] > 0 and both[0]["seconds"] >= 0


def test_bad_request_fails_alone(service, tokenizer):
    good = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=2)
    data = [make_datum(tokenizer, TEXTS[1])]
    reference = good.forward(data, "cross_entropy").result(60).loss_fn_outputs[0]["logprobs"].to_numpy()
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [1.0, 1.0]})
    bad_future = good.forward([data[0], bad], "cross_entropy")
    again = good.forward(data, "cross_entropy")
    with pytest.raises(wb.InvalidRequestError) as info:
        bad_future.result(60)
    assert info.value.where == "data[1].loss_fn_inputs.weights"
    assert "expected [3]" in info.value.message
    np.testing.assert_array_equal(again.result(60).loss_fn_outputs[0]["logprobs"].to_numpy(), reference)


def test_save_state_and_resume_with_optimizer(service, tokenizer):
    training = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=3)
    data = [make_datum(tokenizer, t) for t in TEXTS]
    adam = types.AdamParams(learning_rate=2e-3, weight_decay=0.01)
    for _ in range(3):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(adam).result(60)
    path = training.save_state("ckpt").result(60).path
    assert path == f"wb://{training.model_id}/weights/ckpt"
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed.model_id != training.model_id and resumed.lora_rank == 4
    losses = []
    for client in (training, resumed):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(adam).result(60)
        losses.append(client.forward(data, "cross_entropy").result(60).metrics["loss:sum"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-6)


def test_forward_backward_custom_matches_cross_entropy(service, tokenizer):
    torch = pytest.importorskip("torch")
    a = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=4)
    b = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=4)
    data = [make_datum(tokenizer, t) for t in TEXTS]

    def loss_fn(batch, logprobs_list):
        loss = sum(-(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
                   for d, lp in zip(batch, logprobs_list))
        return loss, {}

    custom = a.forward_backward_custom(data, loss_fn)
    a.optim_step(types.AdamParams(learning_rate=1e-3)).result(60)
    plain = b.forward_backward(data, "cross_entropy")
    b.optim_step(types.AdamParams(learning_rate=1e-3)).result(60)
    assert custom.result(60).metrics["loss:sum"] == pytest.approx(plain.result(60).metrics["loss:sum"], rel=1e-5)
    after = [c.forward(data, "cross_entropy").result(60).metrics["loss:sum"] for c in (a, b)]
    assert after[0] == pytest.approx(after[1], rel=1e-5)


def test_futures_from_threads_and_asyncio(service, tokenizer):
    import asyncio

    training = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=5)
    data = [make_datum(tokenizer, TEXTS[0])]
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        training.forward(data, "cross_entropy").result(60).metrics["loss:sum"])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1

    async def main():
        fut = await training.forward_async(data, "cross_entropy")
        return (await fut).metrics["loss:sum"]

    assert asyncio.run(main()) == results[0]


def test_errors_are_clear(server, service):
    with pytest.raises(wb.NotFoundError) as info:
        service.create_lora_training_client(base_model="no-such-model")
    assert "tiny-qwen3" in str(info.value) and "no-such-model" in str(info.value)
    with pytest.raises(wb.AuthenticationError):
        wb.ServiceClient(base_url=server.url, api_key="wrong-key")
    from workbench.connection import Connection

    with pytest.raises(wb.ConnectionFailedError) as info:
        Connection("tcp://127.0.0.1:9", "k", connect_timeout=1.0)
    assert "tcp://127.0.0.1:9" in str(info.value) and "workbench-server" in str(info.value)
    with pytest.raises(wb.NotFoundError):
        service.create_sampling_client(model_path="wb://run-000000000000/sampler_weights/x")


def test_malformed_messages_get_error_replies_and_server_lives_on(server):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.url)
    cases = [
        [b"\xc1garbage"],                                               # not msgpack
        wire.encode({"v": 999, "id": "x1", "op": "hello", "key": server.api_key, "args": {}}),
        wire.encode({"v": wire.PROTOCOL_VERSION, "id": "x2", "op": "no_such_op",
                     "key": server.api_key, "args": {}}),
        wire.encode({"v": wire.PROTOCOL_VERSION, "id": "x3", "op": "hello", "key": "bad", "args": {}}),
    ]
    expected = ["ProtocolError", "ProtocolError", "InvalidRequestError", "AuthenticationError"]
    for frames, kind in zip(cases, expected):
        sock.send_multipart(frames)
        assert sock.poll(10000), "no reply"
        reply = wire.decode(sock.recv_multipart())
        assert reply["ok"] is False and reply["error"]["type"] == kind, reply
    sock.send_multipart(wire.encode(wire.request("x4", "hello", server.api_key, {})))
    assert sock.poll(10000)
    assert wire.decode(sock.recv_multipart())["ok"] is True
    sock.close(0)
