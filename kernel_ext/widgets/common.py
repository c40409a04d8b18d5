"""Shared widget plumbing: update throttling, downsampling, smoothing, the event stream.

Widgets are fed from background threads (the SDK's I/O thread calls listeners; the event
stream has its own thread). Every update of a FigureWidget resends whole arrays to the
browser, so widgets never redraw per event: they mark themselves dirty and a `Throttle`
redraws at most a few times a second, each redraw one plotly `batch_update()`.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Any, Callable, Optional, Sequence

MAX_POINTS = 2000
MAX_UPDATES_PER_SECOND = 4.0


class Throttle:
    """Coalesces `request()` calls into at most `max_per_second` calls of `flush`.

    The first request after a quiet period flushes at once; requests arriving within the
    interval are folded into one flush at the end of it. Thread-safe; `flush` runs on a
    timer thread (or the caller's thread for `flush_now`), never two at a time.
    """

    def __init__(self, flush: Callable[[], None], max_per_second: float = MAX_UPDATES_PER_SECOND):
        if not max_per_second > 0:
            raise ValueError(f"max_per_second must be > 0, got {max_per_second}")
        self.interval = 1.0 / max_per_second
        self._flush = flush
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        self._last = -math.inf
        self.flushes = 0  # how many times flush ran (tests read this)

    def request(self) -> None:
        with self._lock:
            if self._timer is not None:
                return  # a flush is already scheduled and will see this change
            delay = max(0.0, self._last + self.interval - time.monotonic())
            self._timer = threading.Timer(delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        self._run()

    def flush_now(self) -> None:
        """Flush at once (e.g. when a run ends), cancelling a scheduled flush."""
        with self._lock:
            self._cancel_timer()
            self._last = time.monotonic()
        self._run()

    def _run(self) -> None:
        with self._flush_lock:
            self.flushes += 1
            try:
                self._flush()
            except Exception:  # a drawing bug must not kill the timer thread silently
                traceback.print_exc()

    def cancel(self) -> None:
        with self._lock:
            self._cancel_timer()

    def _cancel_timer(self) -> None:  # the caller holds self._lock
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def downsample(xs: Sequence[float], ys: Sequence[float], max_points: int = MAX_POINTS
               ) -> tuple[list[float], list[float]]:
    """At most ~max_points points: per bucket keep its min and max (so spikes stay visible),
    always keep the last point (so the curve ends where training is)."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"xs has {n} points but ys has {len(ys)}")
    if n <= max_points:
        return list(xs), list(ys)
    buckets = max(1, max_points // 2)
    size = n / buckets
    keep: list[int] = []
    for b in range(buckets):
        lo, hi = int(b * size), min(n, int((b + 1) * size))
        if lo >= hi:
            continue
        idx = range(lo, hi)
        i_min = min(idx, key=lambda i: ys[i])
        i_max = max(idx, key=lambda i: ys[i])
        keep.extend(sorted({i_min, i_max}))
    if keep[-1] != n - 1:
        keep.append(n - 1)
    return [xs[i] for i in keep], [ys[i] for i in keep]


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing; 0 = raw)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = smoothing * acc + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(acc / weight)
    return out


def in_kernel() -> bool:
    """True inside a Jupyter kernel (widgets can render); False in a terminal or test shell."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def widget_bundle(widget: Any, text: str, html_snapshot: str) -> dict:
    """A display bundle: the live widget in a kernel, plus HTML and text snapshots that
    static viewers (nbconvert, GitHub, a terminal) show instead."""
    bundle = {"text/plain": text, "text/html": html_snapshot}
    if in_kernel():
        view = widget._repr_mimebundle_()
        if isinstance(view, tuple):
            view = view[0]
        bundle.update({k: v for k, v in (view or {}).items() if k != "text/plain"})
    return bundle


def events_url(service: Any) -> str:
    """The server's event-stream URL (from the hello reply)."""
    url = service.events_url
    if not url:
        raise RuntimeError("this server announced no event stream (no events_url in its hello reply)")
    return url


class EventStream:
    """Subscribes to the server's PUB socket on a background thread and fans events out.

    One per events URL per process (`EventStream.for_url`); subscribers get every decoded
    event dict (`fn(event)`) on the stream's thread. `latest` holds the last event seen.
    On a CURVE server (--curve-secret-file) the SUB socket encrypts with `server_public_key`;
    left None, it uses the key of this process's ServiceClient connected to that server, if
    any (so `EventStream.for_url(service.events_url)` works either way).
    """

    _streams: dict[str, "EventStream"] = {}
    _streams_lock = threading.Lock()

    def __init__(self, url: str, topics: Sequence[str] = ("cycle",),
                 server_public_key: "str | bytes | None" = None):
        import zmq

        from workbench.connection import check_curve_key, server_key_for_events

        self.url = url
        self._server_key = (check_curve_key(server_public_key) if server_public_key is not None
                            else server_key_for_events(url))
        self.latest: Optional[dict] = None
        self.received = 0
        self._subscribers: list[Callable[[dict], None]] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._topics = [t.encode() for t in topics]
        self._thread = threading.Thread(target=self._loop, name="workbench-events", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str, server_public_key: "str | bytes | None" = None) -> "EventStream":
        with cls._streams_lock:
            stream = cls._streams.get(url)
            if stream is None or stream._stop.is_set():
                stream = cls._streams[url] = cls(url, server_public_key=server_public_key)
            return stream

    def subscribe(self, fn: Callable[[dict], None]) -> None:
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Callable[[dict], None]) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def _loop(self) -> None:
        import zmq

        from workbench import wire
        from workbench.connection import curve_client

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
            if self._streams.get(self.url) is self:
                del self._streams[self.url]

    @classmethod
    def close_all(cls) -> None:
        for stream in list(cls._streams.values()):
            stream.close()
