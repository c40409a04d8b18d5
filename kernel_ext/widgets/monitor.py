"""Server monitor: the server's clock cycles over time, from its event stream.

Each cycle event carries cycle, start, seconds, tenants, runs, requests (by kind), tokens,
queue_depth and queue_depth_by_tenant (shown in the header). The monitor keeps them all and
draws four panels (tenants, tokens, seconds per cycle, queue depth) against the cycle number,
throttled and downsampled like the loss curve.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Optional

from workbench.events import EventStream

from .. import render
from .common import MAX_POINTS, Throttle, downsample, widget_bundle

PANELS = ("tenants", "tokens", "seconds", "queue_depth")


def _number(value: Any) -> float:
    """A figure as a number; dict-valued figures (per kind / per run) are summed."""
    if isinstance(value, dict):
        return float(sum(_number(v) for v in value.values()))
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class ServerMonitor:
    def __init__(self, stream: Optional[EventStream] = None, max_points: int = MAX_POINTS):
        import ipywidgets as w
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go

        self.max_points = max_points
        self.cycles: list[float] = []
        self.values: dict[str, list[float]] = {name: [] for name in PANELS}
        self.latest: Optional[dict] = None
        self._lock = threading.Lock()
        base = make_subplots(rows=len(PANELS), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                             subplot_titles=[p.replace("_", " ") for p in PANELS])
        base.update_layout(height=520, showlegend=False, margin=dict(l=50, r=10, t=30, b=30))
        self.fig = go.FigureWidget(base)
        for row, name in enumerate(PANELS, start=1):
            self.fig.add_scatter(name=name, mode="lines", row=row, col=1)
        self.fig.update_xaxes(title_text="cycle", row=len(PANELS), col=1)
        self.header = w.HTML(value=self.header_html())
        self.header.add_class("wb-monitor-header")
        self.widget = w.VBox([self.header, self.fig])
        self.throttle = Throttle(self._redraw)
        self.stream = stream
        if stream is not None:
            stream.subscribe(self.record)

    def record(self, event: dict) -> None:
        """One cycle event (called on the event-stream thread)."""
        if "cycle" not in event:
            return
        with self._lock:
            self.latest = dict(event)
            self.cycles.append(float(event["cycle"]))
            for name in PANELS:
                self.values[name].append(_number(event.get(name, 0)))
        self.throttle.request()

    def header_html(self) -> str:
        ev = self.latest
        if ev is None:
            return '<div class="wb-monitor-latest" style="font-family:monospace">waiting for cycles...</div>'
        requests = ev.get("requests") or {}
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(requests.items())) if isinstance(requests, dict) else str(requests)
        by_tenant = ev.get("queue_depth_by_tenant") or {}  # {tenant: queued requests}, when any
        queued = ""
        if isinstance(by_tenant, dict) and by_tenant:
            queued = " (" + ", ".join(f"{t} {n}" for t, n in sorted(by_tenant.items())) + ")"
        return (f'<div class="wb-monitor-latest" style="font-family:monospace">cycle '
                f'<b class="wb-monitor-cycle">{int(ev["cycle"])}</b> · tenants {ev.get("tenants", "-")} · '
                f'runs {ev.get("runs", "-")} · tokens {ev.get("tokens", "-")} · '
                f'{_number(ev.get("seconds", 0)) * 1000:.1f} ms · queue {ev.get("queue_depth", "-")}{html.escape(queued)} · '
                f'requests {html.escape(kinds) or "-"} · {len(self.cycles)} cycles seen</div>')

    def _redraw(self) -> None:
        with self._lock:
            series = {name: downsample(self.cycles, self.values[name], self.max_points) for name in PANELS}
        self.header.value = self.header_html()
        with self.fig.batch_update():
            for index, name in enumerate(PANELS):
                self.fig.data[index].x, self.fig.data[index].y = series[name]

    def flush(self) -> None:
        self.throttle.flush_now()

    def static_html(self) -> str:
        with self._lock:
            plots = "".join(render.svg_lines({name: (list(self.cycles), list(self.values[name]))},
                                             height=120, title=name) for name in PANELS)
        return self.header_html() + plots

    def __repr__(self) -> str:
        ev = self.latest
        tail = "no cycles yet" if ev is None else (f"last cycle {int(ev['cycle'])}: tenants {ev.get('tenants')}, "
                                                   f"tokens {ev.get('tokens')}, {_number(ev.get('seconds')):.3f} s")
        return f"ServerMonitor({len(self.cycles)} cycles; {tail})"

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.static_html())

    def detach(self) -> None:
        """Stop listening to the event stream; the figures stay on screen with every cycle
        received (`%tinker stop` detaches, so the record of a finished session stays)."""
        if self.stream is not None:
            self.stream.unsubscribe(self.record)
            self.stream = None
        self.throttle.flush_now()

    def close(self) -> None:
        self.detach()
        self.throttle.cancel()
        for widget in (self.header, self.fig, self.widget):
            widget.close()
