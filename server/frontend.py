"""The ZeroMQ frontend: sockets, auth, idempotency, argument checks, replies, events.

One I/O thread (the caller of `serve`) owns every socket. Requests arrive on a ROUTER;
replies produced on the engine thread are handed back through a queue plus an inproc
wake-up socket, because ZeroMQ sockets must never be shared between threads.

Events, private by tenant (DESIGN §7). A PUB socket cannot tell its subscribers apart, so it
carries only the anonymous aggregate of each cycle (topic b"cycle": `PUBLIC_CYCLE_FIELDS`,
no run ids, no tenant names, no metrics). A tenant's own events travel on the ROUTER, to the
connections that asked with `subscribe_events {topics}` under that tenant's API key (and
through CURVE, when on): each cycle's aggregate plus that tenant's own `run_metrics` and own
`queue_depth_by_tenant` entry, and its own sessions' events (topic "session"). A subscription
is a lease of `event_lease` seconds that the client renews (the SDK does, every third of it);
each tenant holds at most `max_subscriptions`, the least recently renewed giving way.

The frontend never runs tensor code: it checks envelopes and keys, answers metadata ops at
once, and turns engine ops into `Work` for the scheduler.

Sessions (`server.sessions.Sessions`, one book shared with the Tinker gateway): a client
names its session in `heartbeat {session_id}` and in create_model's / create_sampling_session's
`session_id`; a run or sampler created without one is a session of its own. Any request that
names the session or one of its runs or samplers counts as a sign of life, and unparks a
parked session before the request is queued. The serve loop sweeps for silent sessions; the
tracker's events go to the session's tenant (topic "session"). `end_session {session_id}` is
a client's goodbye: the session is finished at once. A finished or silent session's requests
still queued are cancelled (`scheduler.cancel_session`; the book's `on_gone`), each answered
"cancelled: the client session ended"; work already running finishes.

Reply cache (idempotent request ids): the last `reply_cache` replies, at most
`reply_cache_bytes` in all; a reply larger than that budget is sent once and not kept: a
resend of its id gets an error saying so instead of a second execution.

CURVE: `bind(..., curve_secret_key=...)` makes the ROUTER and the PUB socket CURVE servers.
Any client that knows the server's public key may connect (no ZAP handler: tenants are still
told apart by API keys, which now travel encrypted); a client without it gets no handshake,
so it never reaches `_on_message`.

Message size: a request whose frames total more than `max_message_bytes` gets a
ProtocolError reply without being decoded; a single frame over twice that limit makes ZeroMQ
drop the sender's connection (ZMQ_MAXMSGSIZE), so such a message is never buffered whole.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

import msgpack
import zmq

from workbench import wire
from workbench.errors import (
    AuthenticationError, InvalidRequestError, ProtocolError, RequestFailedError, WorkbenchError,
)

from . import ops
from .scheduler import Scheduler, SessionEnded, Work, as_error, cancel_session
from .sessions import Key, Sessions

SERVER_VERSION = "0.1.0"
_WAKE_ADDR = "inproc://workbench-replies"
EVENT_TOPICS = ("cycle", "session")  # what subscribe_events may ask for
# The cycle figures anyone may see (the PUB socket): aggregates without names or ids.
PUBLIC_CYCLE_FIELDS = ("cycle", "start", "seconds", "tenants", "runs", "requests", "tokens", "queue_depth")


class _Subscription:
    __slots__ = ("tenant", "topics", "expires")

    def __init__(self, tenant: str, topics: frozenset, expires: float):
        self.tenant, self.topics, self.expires = tenant, topics, expires


class Frontend:
    def __init__(
        self,
        scheduler: Scheduler,
        keys: dict[str, str],
        info: Callable[[], dict],
        max_message_bytes: int = 256 * 1024 * 1024,
        reply_cache: int = 4096,
        sessions: Optional[Sessions] = None,
        max_rank: int = 128,
        limits: Optional[ops.Limits] = None,  # per-request bounds; default: max_rank alone
        capabilities: Callable[[], dict] = lambda: {"supported_models": []},
        reply_cache_bytes: int = 256 * 2**20,
        event_lease: float = 30.0,
        max_subscriptions: int = 64,
    ):
        self.scheduler = scheduler
        self.keys = keys  # api key -> tenant
        self.info = info  # metadata for hello / capabilities (models available, ...)
        self.max_message_bytes = max_message_bytes
        self.ctx = zmq.Context.instance()
        # (identity, tenant, request id, message); identity None: an event (tenant None:
        # a cycle, for everyone in its own view; else for that tenant only).
        self._outbox: "queue.Queue[tuple[Optional[bytes], Optional[str], str, dict]]" = queue.Queue()
        self._wake_lock = threading.Lock()
        self._wake_push: Optional[zmq.Socket] = None
        # (tenant, request id) -> encoded reply, or None while in flight. Bounded LRU.
        self._replies: "OrderedDict[tuple[str, str], Optional[list]]" = OrderedDict()
        self._reply_cache = reply_cache
        self._reply_cache_bytes = reply_cache_bytes
        self._reply_bytes = 0  # bytes of the replies kept
        # Event subscriptions by connection identity (the I/O thread's alone).
        self._subscriptions: dict[bytes, _Subscription] = {}
        self.event_lease = event_lease
        self.max_subscriptions = max_subscriptions
        self._stop = threading.Event()
        # Without a shared book (tests, tools) sessions are kept, parking does nothing, and
        # a session's end still cancels its queued work.
        self.sessions = sessions if sessions is not None else Sessions(
            120.0, on_gone=lambda tenant, session, members: cancel_session(scheduler, tenant, session, members),
            publish_to=lambda tenant, event: self.publish("session", event, tenant))
        self.limits = limits if limits is not None else ops.Limits(max_rank=max_rank)
        self.capabilities = capabilities  # -> GetServerCapabilitiesResponse fields
        self.url = ""
        self.events_url = ""

    # --------------------------------------------------------------- sockets

    def bind(self, host: str, port: int, curve_secret_key: Optional[bytes] = None) -> str:
        """Bind the request and event sockets; with a z85 `curve_secret_key` both are CURVE
        servers (the options must be set before bind to apply to its connections)."""
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)  # per frame
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if curve_secret_key is not None:
            public_key = zmq.curve_public(curve_secret_key)
            for sock in (self.router, self.pub):
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret_key)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key)
        if port == 0:
            port = self.router.bind_to_random_port(f"tcp://{host}")
        else:
            self.router.bind(f"tcp://{host}:{port}")
        events_port = self.pub.bind_to_random_port(f"tcp://{host}")
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(_WAKE_ADDR)
        self.url = f"tcp://{host}:{port}"
        self.events_url = f"tcp://{host}:{events_port}"
        return self.url

    def _wake(self) -> None:
        # Called from the engine thread; a PUSH socket used only under this lock.
        with self._wake_lock:
            if self._wake_push is None:
                self._wake_push = self.ctx.socket(zmq.PUSH)
                self._wake_push.setsockopt(zmq.LINGER, 0)
                self._wake_push.connect(_WAKE_ADDR)
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the pipe is full of wake-ups already: the I/O thread will look anyway

    def publish(self, topic: str, event: dict, tenant: Optional[str] = None) -> None:
        """Queue an event (thread-safe). tenant None: a cycle's figures, published as the
        anonymous aggregate on the PUB socket and, to each subscribed tenant, with its own
        run_metrics and queue depth; a tenant: that tenant's subscribers only. An event of
        another topic without a tenant goes nowhere (nothing but the aggregate is public)."""
        self._outbox.put((None, tenant, "event", {"topic": topic, **event}))
        self._wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if time.monotonic() >= next_sweep:  # for both frontends: they share the book
                self.sessions.sweep()
                next_sweep = time.monotonic() + min(1.0, self.sessions.timeout / 4)
            if self.wake_pull in ready:
                while True:
                    try:
                        self.wake_pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            self._flush_outbox()
            if self.router in ready:
                for _ in range(1000):  # bounded, so replies are never starved
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
        self._flush_outbox()
        for sock in (self.router, self.pub, self.wake_pull):
            sock.close(0)
        if self._wake_push is not None:
            with self._wake_lock:
                self._wake_push.close(0)

    def _flush_outbox(self) -> None:
        while True:
            try:
                identity, tenant, request_id, message = self._outbox.get_nowait()
            except queue.Empty:
                return
            if identity is None:
                self._route_event(tenant, message)
                continue
            frames = wire.encode(message)
            self._remember(tenant, request_id, frames)
            self._send(identity, frames)

    # ---------------------------------------------------------------- events

    def _route_event(self, tenant: Optional[str], event: dict) -> None:
        topic = event["topic"]
        now = time.monotonic()
        for identity in [i for i, sub in self._subscriptions.items() if sub.expires <= now]:
            del self._subscriptions[identity]
        if tenant is None:
            if topic != "cycle":
                return
            public = {"v": wire.PROTOCOL_VERSION, "topic": topic,
                      **{k: event[k] for k in PUBLIC_CYCLE_FIELDS if k in event}}
            self.pub.send_multipart([topic.encode(), *wire.encode(public)])
            views: dict[str, list] = {}
            for identity, sub in self._subscriptions.items():
                if topic in sub.topics:
                    if sub.tenant not in views:
                        views[sub.tenant] = wire.encode(_tenant_view(public, event, sub.tenant))
                    self._send(identity, views[sub.tenant])
            return
        frames = None
        for identity, sub in self._subscriptions.items():
            if sub.tenant == tenant and topic in sub.topics:
                frames = frames or wire.encode({"v": wire.PROTOCOL_VERSION, **event})
                self._send(identity, frames)

    def _subscribe(self, identity: bytes, tenant: str, topics: list) -> None:
        """(Re)subscribe this connection to its tenant's events on `topics` ([] ends it)."""
        if not topics:
            self._subscriptions.pop(identity, None)
            return
        now = time.monotonic()
        self._subscriptions[identity] = _Subscription(tenant, frozenset(topics), now + self.event_lease)
        mine = [i for i, sub in self._subscriptions.items() if sub.tenant == tenant]
        while len(mine) > self.max_subscriptions:  # the least recently renewed gives way
            oldest = min(mine, key=lambda i: self._subscriptions[i].expires)
            del self._subscriptions[oldest]
            mine.remove(oldest)

    def _send(self, identity: bytes, frames: list) -> None:
        try:
            self.router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError:
            pass  # the peer went away; its reply stays cached for a resend

    def _remember(self, tenant: str, request_id: str, frames: list) -> None:
        """Keep a reply for resends of its id, within the count and byte bounds (LRU). A
        reply over the whole byte budget is replaced by a short error saying so."""
        if not request_id:
            return
        key = (tenant, request_id)
        size = _size(frames)
        if size > self._reply_cache_bytes:
            frames = wire.encode(wire.error_reply(request_id, RequestFailedError(
                f"the reply to request {request_id} was {size / 2**20:.1f} MiB, too large to keep "
                f"for resends (the server's reply cache holds {self._reply_cache_bytes / 2**20:.1f} "
                "MiB, workbench-server --reply-cache-mb); it was sent once and is not executed "
                "again: send a new request (a new id) to ask again", "id").to_wire()))
            size = _size(frames)
        self._reply_bytes -= _size(self._replies.get(key))
        self._replies[key] = frames
        self._reply_bytes += size
        self._replies.move_to_end(key)
        while self._replies and (len(self._replies) > self._reply_cache
                                 or self._reply_bytes > self._reply_cache_bytes):
            _, evicted = self._replies.popitem(last=False)
            self._reply_bytes -= _size(evicted)

    # -------------------------------------------------------------- requests

    def _on_message(self, frames: list) -> None:
        identity = frames[0].bytes
        request_id: Optional[str] = None
        try:
            size = sum(len(f) for f in frames[1:])
            if size > self.max_message_bytes:
                request_id = _peek_id(frames[1])
                raise ProtocolError(
                    f"message of {size / 2**20:.1f} MiB exceeds the server's limit of "
                    f"{self.max_message_bytes / 2**20:.1f} MiB (workbench-server --max-message-mb); "
                    "send less data per request")
            message = wire.decode(frames[1:])
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                request_id = message["id"]
            message = wire.check_request(message)
            tenant = self.keys.get(message["key"])
            if tenant is None:
                error = AuthenticationError("unknown API key; pass the key the server was started with "
                                            "(api_key= or WORKBENCH_API_KEY)")
                # Back-off, counted for all peers together: a ROUTER peer has no address here and
                # its identity is new on every reconnect, so per identity it would stop nobody.
                # After 5 failures within a minute each further one is answered later (50 ms,
                # doubling, at most 4 s) by a timer thread through the outbox: this thread never
                # waits, and a valid key never comes here. At most 32 answers wait; failures
                # beyond those get none (a flood's own timeouts end them).
                backoff = self.__dict__.setdefault("_key_backoff", [0, 0.0, threading.BoundedSemaphore(32)])
                now = time.monotonic()
                backoff[0], backoff[1] = (1 if now - backoff[1] > 60 else backoff[0] + 1), now
                if backoff[0] <= 5:
                    raise error
                if backoff[2].acquire(blocking=False):
                    reply = wire.error_reply(request_id, error.to_wire())

                    def answer() -> None:
                        backoff[2].release()
                        self._outbox.put((identity, "", "", reply))
                        self._wake()

                    timer = threading.Timer(min(4.0, 0.05 * 2 ** min(backoff[0] - 6, 16)), answer)
                    timer.daemon = True
                    timer.start()
                return
            cached = self._replies.get((tenant, request_id))
            if (tenant, request_id) in self._replies:
                if cached is not None:  # a resent id gets the original reply
                    self._send(identity, cached)
                return  # still in flight: its reply will come once
            self._dispatch(identity, tenant, message)
        except Exception as exc:
            error = as_error(exc)
            self._send(identity, wire.encode(wire.error_reply(request_id, error.to_wire())))

    def _dispatch(self, identity: bytes, tenant: str, message: dict) -> None:
        name, args, request_id = message["op"], message["args"], message["id"]
        op = ops.check_args(name, args, self.limits)
        # A goodbye is no sign of life: it ends the session (without unparking it first).
        session = None if name == "end_session" else self._touch(tenant, name, args)
        if not op.queued:
            result = self._immediate(name, args, tenant, identity)
            self._send(identity, wire.encode(wire.ok_reply(request_id, result)))
            return

        def done(result: Any, error: Optional[BaseException]) -> None:
            # A long request's end is a sign of life too; its cancellation is not.
            if session is not None and not isinstance(error, SessionEnded):
                self.sessions.touch(*session)
            reply = (
                wire.ok_reply(request_id, result) if error is None
                else wire.error_reply(request_id, as_error(error).to_wire())
            )
            self._outbox.put((identity, tenant, request_id, reply))
            self._wake()

        if name == "create_model":
            done = self._joining_session(tenant, args.get("session_id"), "run", done)
        elif name == "create_sampling_session" and (args.get("model_path") or args.get("session_id")):
            # A sampler on a checkpoint holds an adapter worth parking; one on the base model
            # joins its client's session too, so that the session's end cancels its samples.
            done = self._joining_session(tenant, args.get("session_id"), "sampler", done)
        self._replies[(tenant, request_id)] = None  # in flight
        work = Work.of(name, tenant, args, done)
        work.session = session[1] if session is not None else None
        try:
            self.scheduler.submit(work)
        except WorkbenchError:
            del self._replies[(tenant, request_id)]
            raise

    def _immediate(self, op: str, args: dict, tenant: str, identity: Optional[bytes] = None) -> dict:
        """The answer of an op the frontend gives at once (phase None in the op table);
        `identity` is the asking connection (None: answer only, as for a check)."""
        if op == "hello":
            return {
                "protocol": wire.PROTOCOL_VERSION, "server": SERVER_VERSION, "tenant": tenant,
                "events_url": self.events_url, "cycle": self.scheduler.cycle,
                "max_message_bytes": self.max_message_bytes, **self.info(),
            }
        if op == "ping":
            return {"time": time.time(), "cycle": self.scheduler.cycle}
        if op == "heartbeat":
            return {"session_id": args["session_id"], "timeout": self.sessions.timeout}
        if op == "get_server_capabilities":
            return self.capabilities()
        if op == "subscribe_events":
            topics = args.get("topics", list(EVENT_TOPICS))
            if not isinstance(topics, list) or not set(topics) <= set(EVENT_TOPICS):
                raise InvalidRequestError(
                    f"topics must be a list of some of {list(EVENT_TOPICS)} ([] ends the "
                    f"subscription), got {topics!r}", "topics")
            if identity is not None:
                self._subscribe(identity, tenant, topics)
            return {"topics": sorted(set(topics)), "lease": self.event_lease}
        if op == "end_session":
            self.sessions.finish(tenant, args["session_id"])  # its queued work is cancelled
            return {"session_id": args["session_id"]}
        raise AssertionError(f"op {op!r} is in the op table as immediate but has no answer here")

    # -------------------------------------------------------------- sessions

    def _touch(self, tenant: str, op: str, args: dict) -> Optional[Key]:
        """Record a sign of life of the session this request belongs to (named, or through
        its run or sampler), unparking it, and return its key (None for no known session)."""
        session = args.get("session_id")
        if session is not None and not isinstance(session, str):
            raise InvalidRequestError("session_id must be a string", "session_id")
        return self.sessions.touch_request(tenant, args)

    def _joining_session(self, tenant: str, session: Optional[str], kind: str, done: Callable) -> Callable:
        """Wrap a create reply so that the new run or sampler joins its session (its own
        if none) before the client hears of it."""
        id_field = "model_id" if kind == "run" else "sampler_id"

        def joining(result: Any, error: Optional[BaseException]) -> None:
            if error is None and isinstance(result, dict) and id_field in result:
                self.sessions.attach(tenant, session, result[id_field], kind)
            done(result, error)
        return joining


def _tenant_view(public: dict, event: dict, tenant: str) -> dict:
    """A cycle event as `tenant` sees it: the public aggregate, plus its own runs' and
    samplers' metrics and its own queue depth, nothing about anyone else."""
    owners = event.get("owners") or {}
    depth = (event.get("queue_depth_by_tenant") or {}).get(tenant)
    return {
        **public,
        "queue_depth_by_tenant": {tenant: depth} if depth else {},
        "run_metrics": {run: metrics for run, metrics in (event.get("run_metrics") or {}).items()
                        if owners.get(run) == tenant},
    }


def _size(frames: Optional[list]) -> int:
    return sum(len(f) for f in frames) if frames else 0


def _peek_id(header: Any) -> Optional[str]:
    """The request id of an undecoded message, if its header is readable (for the reply)."""
    try:
        message = msgpack.unpackb(header.bytes if hasattr(header, "bytes") else header,
                                  ext_hook=lambda code, data: None, raw=False)
    except Exception:
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id if isinstance(request_id, str) else None
