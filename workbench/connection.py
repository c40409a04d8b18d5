"""The client's connection: one background I/O thread owns the ZeroMQ DEALER socket.

Callers on any thread (scripts, asyncio code, a Jupyter kernel) put requests on a queue and
get an APIFuture back at once; the I/O thread sends them in submission order and resolves
futures as replies arrive. Submission order per connection is preserved end to end: one
queue, one socket, and the server queues each run's requests in arrival order.

CURVE: given the server's public key (a server started with --curve-secret-file), the DEALER
and any event subscriber encrypt and authenticate the server with an ephemeral client keypair
(`curve_client`). ZeroMQ drops a failed CURVE handshake silently, so a missing or wrong key
shows as an unreachable server; that error says so.

Events: the tenant's own events (its runs' metrics, its sessions) come on this same socket,
authenticated by the API key and encrypted like the replies. `add_event_sink` subscribes the
connection (`subscribe_events`, the union of every sink's topics) and the I/O thread renews
the subscription's lease (every third of it); event messages (no request id, a topic) go to
the sinks whose topics match, on the I/O thread, so a sink must be quick
(`workbench.events.EventStream` queues them for its own thread).

Sessions end with `end_session` (`ServiceClient.close()`, and at interpreter exit for the
sessions still live): the server then cancels their requests still queued.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Optional

import zmq

from . import wire
from .errors import (
    ConnectionFailedError, InvalidRequestError, ProtocolError, RequestFailedError, error_from_wire,
)
from .futures import APIFuture
# A protocol fact (workbench.wire); re-exported so `workbench.connection.check_curve_key` works.
from .wire import check_curve_key

CLIENT_VERSION = "0.1.0"
HEARTBEAT_S = 5.0  # how often the I/O thread tells the server each session is alive
_ids = itertools.count()
SERVER_KEY_ENV = "WORKBENCH_SERVER_KEY"


def resolve_server_key(server_public_key: "str | bytes | None") -> Optional[bytes]:
    """The argument if given, else $WORKBENCH_SERVER_KEY, checked; None means no CURVE."""
    if server_public_key is not None:
        return check_curve_key(server_public_key, "server_public_key")
    from_env = os.environ.get(SERVER_KEY_ENV)
    return check_curve_key(from_env, SERVER_KEY_ENV) if from_env else None


def curve_client(socket: "zmq.Socket", server_key: Optional[bytes]) -> None:
    """Make `socket` a CURVE client of the server with this public key (before connect).
    The client keypair is ephemeral: tenants are told apart by API keys, not client keys."""
    if server_key is None:
        return
    public, secret = zmq.curve_keypair()
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_key)


def reachable_events_url(events_url: str, request_url: str) -> str:
    """The events URL as this client can reach it: a server bound to a wildcard address
    (0.0.0.0, ::, *) advertises that address, so take the host the client dialled instead."""
    scheme, _, rest = events_url.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or host.strip("[]") not in ("0.0.0.0", "::", "*"):
        return events_url
    dialled = request_url.partition("://")[2].rpartition(":")[0]
    return f"tcp://{dialled}:{port}" if dialled else events_url


def how_to_start_a_server(url: str, server_key: Optional[bytes] = None) -> str:
    if server_key is not None:
        curve = (
            " This client used CURVE with server_public_key "
            f"{server_key.decode()}: if the server runs, that key may be wrong (compare it "
            "with the curve_public_key in the server's ready line or its --curve-secret-file "
            "PATH.pub), or the server may not use CURVE (then pass no key and unset "
            f"{SERVER_KEY_ENV})"
        )
    else:
        curve = (
            " If the server runs with --curve-secret-file, it requires CURVE encryption and "
            "drops clients without its key silently: pass server_public_key=<the "
            "curve_public_key from its ready line, or its PATH.pub file> or set "
            f"{SERVER_KEY_ENV}"
        )
    return (
        f"could not reach a workbench server at {url}. Start one with "
        "`workbench-server --api-key KEY` (then pass base_url= and api_key=, or set "
        "WORKBENCH_URL and WORKBENCH_API_KEY), or create ServiceClient() with no URL to run "
        "an embedded local server." + curve
    )


class Connection:
    def __init__(self, url: str, api_key: str, connect_timeout: float = 60.0,
                 server_public_key: "str | bytes | None" = None):
        self.url = url
        self.api_key = api_key
        # z85 bytes, or None for a plain (unencrypted) connection. Not read from the
        # environment here: ServiceClient does that (resolve_server_key).
        self.server_public_key = (None if server_public_key is None
                                  else check_curve_key(server_public_key, "server_public_key"))
        self._ctx = zmq.Context()
        self._queue: "queue.Queue[Optional[tuple[str, list, APIFuture]]]" = queue.Queue()
        self._pending: dict[str, APIFuture] = {}
        self._wake_addr = f"inproc://wb-client-{uuid.uuid4().hex}"
        self._wake_pull = self._ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._wake_push = self._ctx.socket(zmq.PUSH)
        self._wake_push.connect(self._wake_addr)
        self._closed = False
        self._pid = os.getpid()
        # Sessions (one per ServiceClient) to heartbeat; the I/O thread reads a copy.
        self._sessions: set[str] = set()
        self._heartbeats_on = True  # off for good once the server says it has no such op
        self._heartbeat_s = HEARTBEAT_S  # shortened to a third of the server's session timeout
        self.heartbeats_sent = 0
        self._beat_now = False
        self._next_heartbeat = 0.0  # monotonic time of the next beat (I/O thread)
        self._heartbeat_inflight: dict[str, str] = {}  # session id -> request id
        # Event sinks: token -> (topics, fn); the server's subscription is their union.
        self._sinks: dict[int, tuple[frozenset, Callable[[dict], None]]] = {}
        self._sink_ids = itertools.count()
        self._sinks_lock = threading.Lock()
        self._subscribe_s = 10.0  # lease renewal interval: a third of the server's lease
        self._next_subscribe = float("inf")  # monotonic time of the next renewal (I/O thread)
        self._renewal_inflight: Optional[str] = None  # request id of the last renewal sent
        self._thread = threading.Thread(target=self._loop, name="workbench-io", daemon=True)
        self._thread.start()
        try:
            self.hello = self.call("hello", {"client": CLIENT_VERSION}).result(connect_timeout)
        except TimeoutError:
            self.close()
            raise ConnectionFailedError(how_to_start_a_server(url, self.server_public_key)) from None
        except Exception:
            self.close()
            raise
        if self.hello.get("protocol") != wire.PROTOCOL_VERSION:
            self.close()
            raise ProtocolError(
                f"server at {url} speaks protocol {self.hello.get('protocol')}, this client "
                f"speaks {wire.PROTOCOL_VERSION}; install matching tinker-workbench versions"
            )
        if self.hello.get("events_url"):
            self.hello["events_url"] = reachable_events_url(self.hello["events_url"], url)

    # ---------------------------------------------------------------- calls

    def call(self, op: str, args: dict) -> APIFuture:
        """Send a request; the future resolves with the raw result (or raises its error)."""
        if self._closed:
            raise ConnectionFailedError(f"the connection to {self.url} is closed")
        future: APIFuture = APIFuture()
        request_id = f"{uuid.uuid4().hex[:12]}-{next(_ids)}"
        try:
            frames = wire.encode(wire.request(request_id, op, self.api_key, args))
            self._check_size(op, frames)
        except Exception as exc:
            future._set_exception(exc)
            return future
        self._queue.put((request_id, frames, future))
        with self._wake_lock:
            self._wake_push.send(b"")
        return future

    def _check_size(self, op: str, frames: list) -> None:
        # A message over the server's limit would be refused (or its connection dropped by
        # ZeroMQ), so refuse it here with the figures and the remedy instead.
        limit = (getattr(self, "hello", None) or {}).get("max_message_bytes")
        if limit:
            size = sum(len(f) for f in frames)
            if size > limit:
                raise InvalidRequestError(
                    f"this {op} request is {size / 2**20:.1f} MiB, over the server's limit of "
                    f"{limit / 2**20:.1f} MiB: split the batch into smaller calls, or start the "
                    "server with a larger --max-message-mb", "args",
                )

    def add_session(self, session_id: str) -> None:
        """Heartbeat this session from now on; the first beat goes out at once, and its
        reply tells the interval the server needs (a third of its session timeout)."""
        self._sessions.add(session_id)
        self._beat_now = True
        with self._wake_lock:
            if not self._closed:
                self._wake_push.send(b"")

    def remove_session(self, session_id: str) -> None:
        self._sessions.discard(session_id)

    def end_session(self, session_id: str, timeout: float = 5.0) -> bool:
        """Stop heartbeating this session and tell the server it ended (its requests still
        queued are cancelled there; those already running finish). True once the server
        confirmed; False if it could not be told (closed connection, server gone, or an
        older server without the op): then the session's silence ends it later."""
        self._sessions.discard(session_id)
        if self._closed:
            return False
        try:
            self.call("end_session", {"session_id": session_id}).result(timeout)
            return True
        except (TimeoutError, RequestFailedError, ConnectionFailedError):
            return False

    # ---------------------------------------------------------------- events

    def add_event_sink(self, topics: Iterable[str], fn: Callable[[dict], None]) -> tuple[int, APIFuture]:
        """Call fn(event) for each of this tenant's events on `topics` (on the I/O thread:
        keep fn quick). Returns (token for remove_event_sink, the subscription's future,
        resolved once the server subscribed this connection)."""
        with self._sinks_lock:
            token = next(self._sink_ids)
            self._sinks[token] = (frozenset(topics), fn)
            return token, self._subscribe_locked()

    def remove_event_sink(self, token: int) -> None:
        with self._sinks_lock:
            if self._sinks.pop(token, None) is not None and not self._closed:
                self._subscribe_locked()

    def _subscribe_locked(self) -> APIFuture:
        # Under _sinks_lock, so requests leave in the order their unions were computed.
        topics = sorted(set().union(*(t for t, _ in self._sinks.values())))
        future = self.call("subscribe_events", {"topics": topics})
        future.add_done_callback(self._on_subscribed)
        return future

    def _on_subscribed(self, future: APIFuture) -> None:
        result = future.result() if future.exception() is None else None
        lease = result.get("lease") if isinstance(result, dict) else None
        if isinstance(lease, (int, float)) and lease > 0:
            self._subscribe_s = max(0.2, lease / 3)  # three renewals per lease
        self._next_subscribe = time.monotonic() + self._subscribe_s

    def _renew_subscription(self, dealer: "zmq.Socket") -> None:
        """Renew the event subscription (I/O thread only): it also re-subscribes after the
        server restarted or the socket reconnected under a new identity."""
        with self._sinks_lock:
            topics = sorted(set().union(*(t for t, _ in self._sinks.values())))
        request_id = f"ev-{uuid.uuid4().hex[:12]}-{next(_ids)}"
        future: APIFuture = APIFuture()
        future.add_done_callback(self._on_subscribed)
        if self._renewal_inflight is not None:  # still unanswered (server away): dropped
            self._pending.pop(self._renewal_inflight, None)
        self._renewal_inflight = request_id
        self._pending[request_id] = future
        self._next_subscribe = time.monotonic() + self._subscribe_s
        dealer.send_multipart(wire.encode(wire.request(
            request_id, "subscribe_events", self.api_key, {"topics": topics})), copy=False)

    def _on_event(self, event: dict) -> None:
        topic = event.get("topic")
        with self._sinks_lock:
            sinks = [fn for topics, fn in self._sinks.values() if topic in topics]
        for fn in sinks:
            try:
                fn(event)
            except Exception:  # a broken sink must not take the I/O thread down
                import traceback

                traceback.print_exc()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        with self._wake_lock:
            self._wake_push.send(b"")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._wake_push.close(0)
        self._ctx.term() if not self._thread.is_alive() else None

    # ---------------------------------------------------------- the I/O thread

    def _loop(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        curve_client(dealer, self.server_public_key)
        dealer.connect(self.url)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        running = True
        self._next_heartbeat = time.monotonic() + self._heartbeat_s
        while running:
            deadlines = [self._next_heartbeat] if self._heartbeats_on else []
            if self._sinks:
                deadlines.append(self._next_subscribe)
            wait = min(deadlines, default=None)
            ready = dict(poller.poll(None if wait is None or wait == float("inf")
                                     else max(0.0, wait - time.monotonic()) * 1000))
            if self._heartbeats_on and (self._beat_now or time.monotonic() >= self._next_heartbeat):
                self._beat_now = False
                self._send_heartbeats(dealer)
                self._next_heartbeat = time.monotonic() + self._heartbeat_s
            if self._sinks and time.monotonic() >= self._next_subscribe:
                self._renew_subscription(dealer)
            if self._wake_pull in ready:
                while True:
                    try:
                        self._wake_pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        running = False
                        break
                    request_id, frames, future = item
                    self._pending[request_id] = future
                    dealer.send_multipart(frames, copy=False)
            if dealer in ready:
                while True:
                    try:
                        frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_reply(frames)
        for future in self._pending.values():
            future._set_exception(ConnectionFailedError(f"connection to {self.url} closed"))
        self._pending.clear()
        dealer.close(0)
        self._wake_pull.close(0)

    def _send_heartbeats(self, dealer: "zmq.Socket") -> None:
        """One heartbeat per live session (I/O thread only). A heartbeat still unanswered
        from last time (server busy or restarting) is dropped, so none pile up."""
        for session_id in list(self._sessions):
            stale = self._heartbeat_inflight.pop(session_id, None)
            if stale is not None:
                self._pending.pop(stale, None)
            request_id = f"hb-{uuid.uuid4().hex[:12]}-{next(_ids)}"
            future: APIFuture = APIFuture()
            future.add_done_callback(lambda f, sid=session_id, rid=request_id: self._on_heartbeat(f, sid, rid))
            self._pending[request_id] = future
            self._heartbeat_inflight[session_id] = request_id
            self.heartbeats_sent += 1
            dealer.send_multipart(wire.encode(wire.request(
                request_id, "heartbeat", self.api_key, {"session_id": session_id})), copy=False)

    def _on_heartbeat(self, future: APIFuture, session_id: str, request_id: str) -> None:
        if self._heartbeat_inflight.get(session_id) == request_id:
            del self._heartbeat_inflight[session_id]
        error = future.exception()
        # A server without the op: stop quietly, it simply does not track sessions.
        if isinstance(error, InvalidRequestError) and "unknown op" in error.message:
            self._heartbeats_on = False
        elif error is None and isinstance(future.result(), dict):
            timeout = future.result().get("timeout")
            if isinstance(timeout, (int, float)) and timeout > 0:
                # Three beats per timeout, so one lost beat never parks a live session.
                self._heartbeat_s = min(HEARTBEAT_S, timeout / 3)
                self._next_heartbeat = min(self._next_heartbeat, time.monotonic() + self._heartbeat_s)

    def _on_reply(self, frames: list) -> None:
        try:
            reply = wire.decode(frames)
        except wire.WireError:
            return  # a corrupted reply cannot be matched to a request; its caller times out
        if isinstance(reply, dict) and "id" not in reply and isinstance(reply.get("topic"), str):
            self._on_event(reply)  # one of this tenant's events (subscribe_events)
            return
        future = self._pending.pop(reply.get("id"), None) if isinstance(reply, dict) else None
        if future is None:
            return
        if reply.get("ok"):
            future._set_result(reply.get("result"))
        else:
            future._set_exception(error_from_wire(reply.get("error") or {}))

    def __getstate__(self) -> Any:
        raise TypeError("a Connection cannot be pickled; pickle the SamplingClient instead")


_connections: dict[tuple[str, str, Optional[bytes], int], Connection] = {}
_connections_lock = threading.Lock()


def connection_for(url: str, api_key: str, connect_timeout: float = 60.0,
                   server_public_key: Optional[bytes] = None) -> Connection:
    """One shared connection per (url, key, CURVE server key) per process (re-made after a
    fork). The server key is part of the identity, so a client with a wrong key never
    borrows a working connection, nor the reverse."""
    key = (url, api_key, server_public_key, os.getpid())
    with _connections_lock:
        conn = _connections.get(key)
        if conn is None or conn._closed:
            conn = Connection(url, api_key, connect_timeout, server_public_key)
            _connections[key] = conn
            _register_goodbye()
        return conn


_goodbye_registered = False
GOODBYE_S = 1.0  # at most this long, in all, at interpreter exit


def _register_goodbye() -> None:
    """Register the exit goodbye once, after the first connection exists: atexit runs last
    registered first, so it runs before an embedded server started earlier is stopped."""
    global _goodbye_registered
    if not _goodbye_registered:
        _goodbye_registered = True
        atexit.register(_goodbye_at_exit)


def _goodbye_at_exit() -> None:
    """End the sessions still live in this process (their ServiceClients were never closed),
    so that the server cancels their queued work now rather than after their silence."""
    deadline = time.monotonic() + GOODBYE_S
    futures = []
    for conn in list(_connections.values()):
        if conn._pid != os.getpid() or conn._closed:
            continue
        for session_id in list(conn._sessions):
            conn._sessions.discard(session_id)
            try:
                futures.append(conn.call("end_session", {"session_id": session_id}))
            except Exception:
                pass
    for future in futures:
        try:
            future.result(max(0.0, deadline - time.monotonic()))
        except Exception:
            pass
