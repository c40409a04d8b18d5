"""Shared widget plumbing: update throttling, downsampling, smoothing.

Widgets are fed from background threads (the SDK's I/O thread calls listeners; the SDK's
event stream, `workbench.events.EventStream`, has its own thread). Every update of a FigureWidget resends whole arrays to the
browser, so widgets never redraw per event: they mark themselves dirty and a `Throttle`
redraws at most a few times a second, each redraw one plotly `batch_update()`.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Any, Callable, Optional, Sequence

# The event stream is the SDK's (workbench.events); re-exported for old imports.
from workbench.events import EventStream  # noqa: F401

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


def smoothing_slider(value: float) -> Any:
    """The EMA smoothing slider (0 = raw) of the loss curve and `%tinker plot`."""
    import ipywidgets as w

    return w.FloatSlider(value=value, min=0.0, max=max(0.99, value), step=0.01, description="smoothing",
                         readout_format=".2f", continuous_update=True)


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
    """The server's event-stream URL (from the hello reply); RuntimeError if it has none.
    To subscribe, `service.events()` is simpler: it also brings the CURVE key."""
    url = service.events_url
    if not url:
        raise RuntimeError("this server announced no event stream (no events_url in its hello reply)")
    return url
