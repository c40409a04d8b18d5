"""The server's event stream: a ZeroMQ SUB socket on its PUB socket, read on a thread.

The server publishes one event per clock cycle (topic ``cycle``) and session changes (topic
``session``) at the ``events_url`` of its hello reply (the event schema is in
`workbench.wire`). `ServiceClient.events()` is the usual way in: it returns the stream for
that client's server, encrypted with its CURVE key when it has one. `EventStream.for_url`
serves callers that have only a URL (and the key, for a CURVE server).
"""

from __future__ import annotations

import threading
import traceback
from typing import Callable, Optional, Sequence

import zmq

from . import wire
from .connection import curve_client
from .wire import check_curve_key

DEFAULT_TOPICS = ("cycle",)


class EventStream:
    """Subscribes to the server's PUB socket on a background thread and fans events out.

    Shared per process: one per (events URL, topics, server key), from `for_url` (or
    `ServiceClient.events()`). Subscribers get every decoded event dict (`fn(event)`) on the
    stream's thread; `latest` holds the last event seen, `received` counts them. On a CURVE
    server (--curve-secret-file) the SUB socket encrypts with `server_public_key` (z85);
    without it such a server's events never arrive.
    """

    _streams: dict[tuple, "EventStream"] = {}
    _streams_lock = threading.Lock()

    def __init__(self, url: str, topics: Sequence[str] = DEFAULT_TOPICS,
                 server_public_key: "str | bytes | None" = None):
        self.url = url
        self._server_key = check_curve_key(server_public_key) if server_public_key is not None else None
        self.latest: Optional[dict] = None
        self.received = 0
        self._subscribers: list[Callable[[dict], None]] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._topics = [t.encode() for t in topics]
        self._key = _stream_key(url, topics, self._server_key)
        self._thread = threading.Thread(target=self._loop, name="workbench-events", daemon=True)
        self._thread.start()

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
                self.latest = event
                self.received += 1
                for fn in list(self._subscribers):
                    try:
                        fn(event)
                    except Exception:
                        traceback.print_exc()
        finally:
            sub.close(0)
            self._ctx.term()

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        with self._streams_lock:
            if self._streams.get(self._key) is self:
                del self._streams[self._key]

    @classmethod
    def close_all(cls) -> None:
        for stream in list(cls._streams.values()):
            stream.close()


def _stream_key(url: str, topics: Sequence[str], server_key: Optional[bytes]) -> tuple:
    # The key is part of the identity (as for connections): a stream opened with a wrong or
    # missing key is never handed to a caller with the right one, nor the reverse.
    return (url, tuple(topics), server_key)
