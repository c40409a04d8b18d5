"""The server's events, fanned out to subscribers on a thread.

Two sources (the event schema is in `workbench.wire`):

- A tenant's own events (`for_connection`, what `ServiceClient.events()` returns): one event
  per clock cycle (topic ``cycle``: the cycle's aggregate figures plus this tenant's own
  ``run_metrics`` and ``queue_depth_by_tenant`` entry) and its sessions' changes (topic
  ``session``). They arrive on the client's request connection, subscribed with its API key
  (`Connection.add_event_sink`, op ``subscribe_events``) and CURVE-encrypted like the
  replies; the server sends a tenant nothing about other tenants.
- The public stream (`for_url`): a SUB socket on the PUB socket at hello's ``events_url``,
  each cycle's anonymous aggregate only (no run ids, no tenant names, no metrics), for
  dashboards that hold no key.
"""

from __future__ import annotations

import queue
import threading
import traceback
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import zmq

from . import wire
from .connection import curve_client
from .wire import check_curve_key

if TYPE_CHECKING:
    from .connection import Connection

DEFAULT_TOPICS = ("cycle",)
INBOX_EVENTS = 10_000  # events waiting for the stream's thread; beyond, the newest are dropped


class EventStream:
    """Receives events on a background thread and fans them out.

    Shared per process: one per (connection, topics) from `for_connection` (what
    `ServiceClient.events()` returns: this tenant's events), or one per (events URL, topics,
    server key) from `for_url` (the public aggregate). Subscribers get every decoded event
    dict (`fn(event)`) on the stream's thread; `latest` holds the last event seen, `received`
    counts them. On a CURVE server (--curve-secret-file) a public stream's SUB socket
    encrypts with `server_public_key` (z85); without it such a server's events never arrive.
    """

    _streams: dict[tuple, "EventStream"] = {}
    _streams_lock = threading.Lock()

    def __init__(self, url: str, topics: Sequence[str] = DEFAULT_TOPICS,
                 server_public_key: "str | bytes | None" = None, *,
                 connection: "Optional[Connection]" = None, subscribe_timeout: float = 10.0):
        self.url = url
        self._server_key = check_curve_key(server_public_key) if server_public_key is not None else None
        self.latest: Optional[dict] = None
        self.received = 0
        self.dropped = 0  # events lost because subscribers fell INBOX_EVENTS behind
        self._subscribers: list[Callable[[dict], None]] = []
        self._stop = threading.Event()
        self._topics = [t.encode() for t in topics]
        self._connection = connection
        self._sink: Optional[int] = None
        if connection is None:
            self._ctx = zmq.Context()
            self._key = _stream_key(url, topics, self._server_key)
            target = self._loop
        else:
            self._key = _connection_key(connection, topics)
            self._inbox: "queue.Queue[dict]" = queue.Queue(INBOX_EVENTS)
            target = self._relay
        self._thread = threading.Thread(target=target, name="workbench-events", daemon=True)
        self._thread.start()
        if connection is not None:
            self._sink, subscribed = connection.add_event_sink(topics, self._enqueue)
            try:  # subscribed before we return: no event of a later request is missed
                subscribed.result(subscribe_timeout)
            except TimeoutError:
                pass  # the connection renews the subscription; events come once it is through
            except Exception:
                self.close()
                raise

    @classmethod
    def for_connection(cls, connection: "Connection", topics: Sequence[str] = DEFAULT_TOPICS) -> "EventStream":
        """The shared stream of this tenant's events on `topics`, through `connection` (its
        API key, its CURVE key), started and subscribed on first use."""
        key = _connection_key(connection, topics)
        with cls._streams_lock:
            stream = cls._streams.get(key)
            if stream is not None and not stream._stop.is_set() and stream._connection is connection \
                    and not connection._closed:
                return stream
        stream = cls(connection.url, topics, connection=connection)  # subscribes: not under the lock
        with cls._streams_lock:
            other = cls._streams.get(key)
            if other is None or other._stop.is_set() or other._connection is not connection:
                cls._streams[key] = stream
                return stream
        stream.close()  # another thread made the same stream meanwhile: share that one
        return other

    @classmethod
    def for_url(cls, url: str, server_public_key: "str | bytes | None" = None,
                topics: Sequence[str] = DEFAULT_TOPICS) -> "EventStream":
        """The shared stream of this URL, topics and CURVE key, started on first use."""
        server_key = check_curve_key(server_public_key) if server_public_key is not None else None
        key = _stream_key(url, topics, server_key)
        with cls._streams_lock:
            stream = cls._streams.get(key)
            if stream is None or stream._stop.is_set():
                stream = cls._streams[key] = cls(url, topics, server_key)
            return stream

    def subscribe(self, fn: Callable[[dict], None]) -> None:
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Callable[[dict], None]) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def _enqueue(self, event: dict) -> None:
        # On the connection's I/O thread: never block it.
        try:
            self._inbox.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def _relay(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._deliver(event)

    def _deliver(self, event: dict) -> None:
        self.latest = event
        self.received += 1
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:
                traceback.print_exc()

    def _loop(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        curve_client(sub, self._server_key)
        for topic in self._topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(self.url)
        try:
            while not self._stop.is_set():
                if not sub.poll(200):
                    continue
                frames = sub.recv_multipart()
                try:
                    event = wire.decode(frames[1:])
                except Exception:
                    continue  # a corrupt event is skipped; the next cycle brings fresh figures
                self._deliver(event)
        finally:
            sub.close(0)
            self._ctx.term()

    def close(self) -> None:
        self._stop.set()
        if self._sink is not None and self._connection is not None:
            sink, self._sink = self._sink, None
            self._connection.remove_event_sink(sink)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        with self._streams_lock:
            if self._streams.get(self._key) is self:
                del self._streams[self._key]

    @classmethod
    def close_all(cls) -> None:
        for stream in list(cls._streams.values()):
            stream.close()


def _connection_key(connection: "Connection", topics: Sequence[str]) -> tuple:
    return ("connection", id(connection), tuple(topics))


def _stream_key(url: str, topics: Sequence[str], server_key: Optional[bytes]) -> tuple:
    # The key is part of the identity (as for connections): a stream opened with a wrong or
    # missing key is never handed to a caller with the right one, nor the reverse.
    return (url, tuple(topics), server_key)
