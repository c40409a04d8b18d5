"""Tenants cannot see or outlive each other (DESIGN §7), over real ZeroMQ and in the books.

One real server process with two tenants (--api-keys), the tiny model, a fixed 250 ms clock
(so that work stays queued long enough to be cancelled) and a 64 KiB reply cache:

- a tenant's event subscription (`ServiceClient.events()`, through the request socket and
  its API key) carries its own runs' metrics, queue depth and sessions, never another
  tenant's run ids, tenant name or losses; the public PUB socket carries only the anonymous
  aggregate;
- the reply cache is bounded in bytes; a reply over the budget is not kept, and a resend of
  its id gets an error saying so instead of a second execution;
- a client that closes (or goes silent) with work queued has that work cancelled, not run,
  while another tenant's work goes on.
"""

from __future__ import annotations

import time
import uuid

import msgpack
import numpy as np
import pytest
import zmq

import workbench as wb
from workbench import types, wire

from conftest import start_tenants_server, text_datum

KEYS = {"key-alpha": "tenant-alpha", "key-bravo": "tenant-bravo"}
PUBLIC_FIELDS = {"v", "topic", "cycle", "start", "seconds", "tenants", "runs", "requests", "tokens", "queue_depth"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_tenants_server(tmp_path_factory.mktemp("privacy"), KEYS, "--cycle-ms", "250",
                                   "--reply-cache-mb", str(64 / 1024))
    yield running
    running.stop(timeout=30)


@pytest.fixture(scope="module")
def alpha(server):
    return wb.ServiceClient(base_url=server.url, api_key="key-alpha")


@pytest.fixture(scope="module")
def bravo(server):
    return wb.ServiceClient(base_url=server.url, api_key="key-bravo")


@pytest.fixture(scope="module")
def tokenizer(alpha):
    return alpha.create_sampling_client(base_model="tiny-qwen3").get_tokenizer()


datum = text_datum


class Collector:
    """Every event a stream delivers, from its thread."""

    def __init__(self, stream):
        self.stream, self.seen = stream, []
        stream.subscribe(self.seen.append)

    def wait(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(list(self.seen)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return predicate(list(self.seen))

    def close(self) -> None:
        self.stream.unsubscribe(self.seen.append)


def _floats(value) -> list[float]:
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) else []


def test_a_tenant_sees_its_own_events_and_nothing_of_anothers(server, alpha, bravo, tokenizer):
    alpha_events = Collector(alpha.events(("cycle", "session")))
    bravo_events = Collector(bravo.events(("cycle", "session")))
    public = zmq.Context.instance().socket(zmq.SUB)  # no key: anyone who can reach the port
    public.setsockopt(zmq.LINGER, 0)
    public.setsockopt(zmq.SUBSCRIBE, b"")
    public.connect(alpha.events_url)
    public_frames: list[list[bytes]] = []
    try:
        time.sleep(0.5)  # PUB/SUB slow joiner, for the raw SUB socket only
        a_run = alpha.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=1)
        b_run = bravo.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=2)
        a_data, b_data = [datum(tokenizer, "alpha's secret training text")], [datum(tokenizer, "bravo's line")]
        alpha_losses, bravo_losses = [], []
        for _ in range(3):  # both tenants in the same cycles
            fa, fb = a_run.forward_backward(a_data, "cross_entropy"), b_run.forward_backward(b_data, "cross_entropy")
            oa = a_run.optim_step(types.AdamParams(learning_rate=1e-2))
            ob = b_run.optim_step(types.AdamParams(learning_rate=1e-2))
            alpha_losses.append(fa.result(60).metrics["loss:sum"])
            bravo_losses.append(fb.result(60).metrics["loss:sum"])
            oa.result(60), ob.result(60)
        # A session of alpha's ends: its event goes to alpha only.
        leaving = wb.ServiceClient(base_url=server.url, api_key="key-alpha")
        leaving.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=3)
        leaving.close()

        def trained(run_id: str):
            return lambda seen: sum("optim_step" in e.get("run_metrics", {}).get(run_id, {}) for e in seen) >= 3

        assert bravo_events.wait(trained(b_run.model_id)), bravo_events.seen
        assert alpha_events.wait(trained(a_run.model_id)), alpha_events.seen
        assert alpha_events.wait(lambda seen: any(e.get("session") == leaving.session_id for e in seen))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if public.poll(100):
                public_frames.append(public.recv_multipart())
    finally:
        alpha_events.close()
        bravo_events.close()
        public.close(0)

    # bravo sees its own run's metrics and losses, and its own queue depth only ...
    mine = [e for e in bravo_events.seen if b_run.model_id in e.get("run_metrics", {})]
    seen_losses = [e["run_metrics"][b_run.model_id]["forward_backward"]["loss:sum"] for e in mine]
    assert seen_losses == pytest.approx(bravo_losses)
    assert all(set(e.get("queue_depth_by_tenant", {})) <= {"tenant-bravo"} for e in bravo_events.seen)
    assert all(set(e.get("run_metrics", {})) <= {b_run.model_id} for e in bravo_events.seen)
    # ... and nothing of alpha's: no run id, tenant name, session or loss, anywhere in any event.
    for event in bravo_events.seen:
        packed = msgpack.packb(event)
        for secret in (a_run.model_id, "tenant-alpha", alpha.session_id, leaving.session_id):
            assert secret.encode() not in packed, (secret, event)
        assert not set(_floats(event)) & set(alpha_losses), event
    assert not [e for e in bravo_events.seen if e["topic"] == "session"]
    # alpha saw its own (and the cycle figures both share: tenants, tokens, ...).
    assert any(e["tenants"] == 2 for e in alpha_events.seen if a_run.model_id in e.get("run_metrics", {}))
    ended = [e for e in alpha_events.seen if e.get("session") == leaving.session_id]
    assert ended[0]["state"] == "parked" and ended[0]["reason"] == "finished"

    # The public PUB socket: only the anonymous aggregate of each cycle.
    assert public_frames, "the public stream published no cycle"
    for topic, *frames in public_frames:
        event = wire.decode(frames)
        assert topic == b"cycle" and set(event) <= PUBLIC_FIELDS, event
        for secret in (a_run.model_id, b_run.model_id, "tenant-alpha", "tenant-bravo", leaving.session_id):
            assert secret.encode() not in b"".join(frames)


def test_subscribe_events_checks_topics_and_a_raw_subscriber_gets_its_tenant_only(server, bravo):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.url)

    def call(op: str, args: dict, key: str = "key-alpha") -> dict:
        request_id = uuid.uuid4().hex
        sock.send_multipart(wire.encode(wire.request(request_id, op, key, args)))
        while sock.poll(10_000):
            message = wire.decode(sock.recv_multipart())
            if message.get("id") == request_id:
                return message
        raise AssertionError(f"no reply to {op}")

    try:
        bad = call("subscribe_events", {"topics": ["cycle", "everything"]})
        assert not bad["ok"] and bad["error"]["where"] == "topics"
        assert call("subscribe_events", {"topics": ["cycle"]}, key="wrong")["error"]["type"] == "AuthenticationError"
        reply = call("subscribe_events", {"topics": ["cycle"]})
        assert reply["ok"] and reply["result"]["topics"] == ["cycle"] and reply["result"]["lease"] > 0
        sampler = bravo.create_sampling_client(base_model="tiny-qwen3")
        sampler.compute_logprobs(types.ModelInput.from_ints([5, 6, 7])).result(60)
        events = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not events:
            if sock.poll(200):
                message = wire.decode(sock.recv_multipart())
                if "id" not in message:
                    events.append(message)
        assert events and events[0]["topic"] == "cycle"
        assert all(not e["run_metrics"] and set(e["queue_depth_by_tenant"]) <= {"tenant-alpha"} for e in events)
        assert call("subscribe_events", {"topics": []})["ok"]  # [] ends it
    finally:
        sock.close(0)


# ------------------------------------------------------------------------ reply cache

def test_reply_cache_is_bounded_in_bytes_and_too_large_replies_say_so_on_resend():
    from server.frontend import Frontend
    from server.scheduler import Scheduler

    frontend = Frontend(Scheduler(), keys={"k": "t"}, info=dict, reply_cache=100, reply_cache_bytes=10_000)
    for i in range(50):
        frontend._remember("t", f"r{i}", [b"x" * 1000])
    assert frontend._reply_bytes <= 10_000 and len(frontend._replies) == 10
    assert ("t", "r49") in frontend._replies and ("t", "r0") not in frontend._replies
    frontend._remember("t", "big", [b"h", b"x" * 20_000])  # over the whole budget: not kept
    assert frontend._reply_bytes <= 10_000
    sent = []
    frontend._send = lambda identity, frames: sent.append(wire.decode(frames))
    frontend._on_message([zmq.Frame(b"peer"), *map(zmq.Frame, wire.encode(wire.request("big", "ping", "k", {})))])
    assert sent[-1]["id"] == "big" and not sent[-1]["ok"]
    assert "too large to keep" in sent[-1]["error"]["message"] and "--reply-cache-mb" in sent[-1]["error"]["message"]
    # Count bound still holds beside the byte bound.
    small = Frontend(Scheduler(), keys={}, info=dict, reply_cache=3)
    for i in range(5):
        small._remember("t", f"r{i}", [b"y"])
    assert len(small._replies) == 3 and small._reply_bytes == 3


def test_downloads_do_not_pile_up_and_a_resent_big_download_is_refused_not_rerun(server, bravo, tokenizer):
    run = bravo.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=4)
    path = run.save_state("cache-test").result(60).path
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.url)

    def send(request_id: str) -> dict:
        sock.send_multipart(wire.encode(wire.request(request_id, "get_checkpoint_files", "key-bravo", {"path": path})))
        while sock.poll(30_000):
            message = wire.decode(sock.recv_multipart())
            if message.get("id") == request_id:
                return message
        raise AssertionError("no reply")

    try:
        first = send("download-1")
        assert first["ok"] and sum(len(v) for v in first["result"]["files"].values()) > 64 * 1024
        again = send("download-1")  # the same id: not executed again, not kept either
        assert not again["ok"] and "too large to keep" in again["error"]["message"]
        assert send("download-2")["ok"]  # a new id asks again
    finally:
        sock.close(0)


# ----------------------------------------------------------------- cancelled work

def test_closing_a_client_cancels_its_queued_work_and_spares_another_tenant(server, bravo, tokenizer):
    closing = wb.ServiceClient(base_url=server.url, api_key="key-alpha")
    run = closing.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=5)
    data = [datum(tokenizer, "queued and then abandoned")]
    before = run.forward(data, "cross_entropy").result(60).metrics["loss:sum"]
    other = bravo.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=6)
    other_futures = []
    for _ in range(2):
        other_futures.append(other.forward_backward([datum(tokenizer, "bravo goes on")], "cross_entropy"))
        other_futures.append(other.optim_step(types.AdamParams(learning_rate=1e-2)))
    queued = []
    for _ in range(15):  # one fb + optim per 250 ms cycle: most of these are still queued ...
        queued.append(run.forward_backward(data, "cross_entropy"))
        queued.append(run.optim_step(types.AdamParams(learning_rate=1e-1)))
    closing.close()  # ... when the goodbye arrives
    outcomes = []
    for future in queued:
        try:
            future.result(60)
            outcomes.append("ran")
        except wb.WorkbenchError as exc:
            assert "cancelled: the client session ended" in str(exc), exc
            outcomes.append("cancelled")
    assert outcomes.count("cancelled") >= 20, outcomes
    assert outcomes == sorted(outcomes, key=lambda o: o == "cancelled"), outcomes  # ran ones first
    for future in other_futures:  # the other tenant is served as if nothing happened
        future.result(60)
    # The run stands still: whoever holds its id (here a new client of the same tenant) finds
    # it where the work that ran left it, and it does not move afterwards.
    again = wb.ServiceClient(base_url=server.url, api_key="key-alpha")
    args = {"model_id": run.model_id, "data": [wire.datum_to_wire(d) for d in data], "loss_fn": "cross_entropy"}
    now = again._connection.call("forward", args).result(60)["metrics"]["loss:sum"]
    time.sleep(0.8)
    assert again._connection.call("forward", args).result(60)["metrics"]["loss:sum"] == now
    if "ran" not in outcomes:
        assert now == pytest.approx(before)
    again.close()


def test_a_silent_session_s_queued_work_is_cancelled_by_the_sweep():
    """In the books: a session that goes silent has its queued requests (its own, and those
    on its runs' queues) answered "cancelled"; another tenant's session of the same name and
    work already taken by a cycle are untouched."""
    from server.frontend import Frontend
    from server.scheduler import Scheduler, cancel_session
    from server.sessions import Sessions

    now = [100.0]
    scheduler = Scheduler()
    sessions = Sessions(10.0, clock=lambda: now[0],
                        on_gone=lambda tenant, session, members: cancel_session(scheduler, tenant, session, members))
    frontend = Frontend(scheduler, keys={"ka": "a", "kb": "b"}, info=dict, sessions=sessions)
    frontend._wake = lambda: None
    sent = []
    frontend._send = lambda identity, frames: sent.append((identity, wire.decode(frames)))
    tokens = np.array([1, 2, 3], dtype=np.int32)
    fb = {"data": [{"tokens": tokens, "loss_fn_inputs": {"target_tokens": tokens, "weights": np.ones(3, np.float32)}}],
          "loss_fn": "cross_entropy"}
    sessions.attach("a", "nb", "run-a")
    sessions.attach("b", "nb", "run-b")
    frontend._dispatch(b"A", "a", wire.request("a1", "forward", "ka", {"model_id": "run-a", **fb}))
    frontend._dispatch(b"A", "a", wire.request("a2", "create_model", "ka", {"base_model": "m", "session_id": "nb"}))
    frontend._dispatch(b"B", "b", wire.request("b1", "forward", "kb", {"model_id": "run-b", **fb}))
    assert scheduler.queue_depth() == 3
    now[0] += 5
    sessions.touch("b", "nb")  # b's session stays alive
    now[0] += 6
    assert sessions.sweep() == [("a", "nb")]
    frontend._flush_outbox()
    replies = {message["id"]: message for _, message in sent}
    assert set(replies) == {"a1", "a2"}
    assert all("cancelled: the client session ended" in m["error"]["message"] for m in replies.values())
    assert scheduler.queue_depth() == 1 and scheduler.queue_depth_by_tenant() == {"b": 1}
    assert sessions.is_parked("a", "nb")  # the cancellations did not count as signs of life
