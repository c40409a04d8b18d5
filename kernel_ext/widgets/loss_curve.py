"""Live loss curve: one plotly FigureWidget for any number of training runs.

Fed by `TrainingClient.add_listener`: forward_backward results are training points (raw and
smoothed), forward results are eval points. Redraws are throttled (at most 4 a second, one
`batch_update()` message each) and long curves are downsampled to about 2k points. Above the
figure: each run's facts (base model, LoRA rank, trainable parameters, server) and a slider
for the EMA smoothing of the smoothed lines.
"""

from __future__ import annotations

import html
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from workbench.run_info import run_facts

from .. import render
from .common import (
    MAX_POINTS, MAX_UPDATES_PER_SECOND, Throttle, downsample, ema, smoothing_slider, widget_bundle,
)


@dataclass
class _Run:
    name: str
    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    eval_steps: list[float] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    traces: Optional[tuple[int, int, int]] = None  # raw, smoothed, eval trace indices
    facts: dict[str, str] = field(default_factory=dict)  # workbench.run_info.run_facts of its client


class LossCurve:
    """`curve.attach(training_client)`; several runs share one figure.

    metric: which metric of a result to plot (default `loss:sum`); if a result lacks it,
    the first metric whose name starts with "loss" is used.
    """

    def __init__(self, metric: str = "loss:sum", smoothing: float = 0.9, max_points: int = MAX_POINTS,
                 max_updates_per_second: float = MAX_UPDATES_PER_SECOND):
        import ipywidgets as w
        import plotly.graph_objects as go

        ema([], smoothing)  # validates smoothing
        self.metric = metric
        self.smoothing = smoothing
        self.max_points = max_points
        self.runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._attached: list[tuple[Any, Any]] = []
        self.fig = go.FigureWidget(layout=dict(
            height=320, margin=dict(l=40, r=10, t=30, b=30), title=dict(text=f"{metric} per step"),
            xaxis=dict(title=dict(text="step")), yaxis=dict(title=dict(text=metric)),
        ))
        self.info = w.HTML()
        self.info.add_class("wb-run-info")
        self.slider = smoothing_slider(smoothing)
        self.slider.observe(lambda change: self.set_smoothing(change["new"]), names="value")
        self.widget = w.VBox([self.info, self.slider, self.fig])
        self.throttle = Throttle(self._redraw, max_updates_per_second)

    def set_smoothing(self, smoothing: float) -> None:
        """Redraw the smoothed lines with this EMA smoothing (what the slider calls)."""
        ema([], smoothing)
        self.smoothing = smoothing
        if self.slider.value != smoothing:
            self.slider.value = smoothing  # its observer calls back here with the same value
        self.throttle.flush_now()

    # ------------------------------------------------------------------ feeding

    def attach(self, client: Any, name: Optional[str] = None) -> str:
        """Start plotting a TrainingClient's results; returns the run's curve name."""
        if not hasattr(client, "add_listener"):
            raise TypeError(f"cannot watch a {type(client).__name__}: it has no add_listener()")
        name = name or getattr(client, "model_id", None) or f"run {len(self.runs) + 1}"
        with self._lock:
            self.runs.setdefault(name, _Run(name)).facts = run_facts(client)
        self.info.value = self.info_html()

        def listener(step: int, kind: str, metrics: dict) -> None:
            self.record(name, step, kind, metrics)

        client.add_listener(listener)
        self._attached.append((client, listener))
        return name

    def _value(self, metrics: dict) -> Optional[float]:
        if self.metric in metrics:
            return float(metrics[self.metric])
        for key in sorted(metrics):
            if key.startswith("loss"):
                return float(metrics[key])
        return None

    def record(self, run: str, step: float, kind: str, metrics: dict) -> None:
        """One result: kind forward_backward -> training point, forward -> eval point."""
        if kind not in ("forward_backward", "forward"):
            return
        value = self._value(metrics)
        if value is None or not math.isfinite(value):
            return
        with self._lock:
            series = self.runs.setdefault(run, _Run(run))
            if kind == "forward_backward":
                series.steps.append(float(step))
                series.values.append(value)
            else:
                series.eval_steps.append(float(step))
                series.eval_values.append(value)
        self.throttle.request()

    # ------------------------------------------------------------------ drawing

    def _snapshot(self) -> list[tuple[_Run, tuple, tuple, tuple]]:
        with self._lock:
            out = []
            for run in self.runs.values():
                raw = downsample(run.steps, run.values, self.max_points)
                xs, smooth = downsample(run.steps, ema(run.values, self.smoothing), self.max_points)
                evals = downsample(run.eval_steps, run.eval_values, self.max_points)
                out.append((run, raw, (xs, smooth), evals))
            return out

    def _redraw(self) -> None:
        import plotly.graph_objects as go

        snapshot = self._snapshot()
        # batch_update sends this redraw's changes as one update message. Not hold_sync():
        # plotly passes each change through a message trait it sets and at once resets to
        # None, and hold_sync would send only that final None (the browser saw no traces).
        with self.fig.batch_update():
            for run, raw, smooth, evals in snapshot:
                if run.traces is None:
                    first = len(self.fig.data)
                    self.fig.add_trace(go.Scatter(name=f"{run.name} raw", mode="lines", opacity=0.35,
                                                  line=dict(width=1), legendgroup=run.name))
                    self.fig.add_trace(go.Scatter(name=f"{run.name}", mode="lines",
                                                  line=dict(width=2.5), legendgroup=run.name))
                    self.fig.add_trace(go.Scatter(name=f"{run.name} eval", mode="markers",
                                                  marker=dict(size=8, symbol="diamond"), legendgroup=run.name))
                    run.traces = (first, first + 1, first + 2)
                for index, (xs, ys) in zip(run.traces, (raw, smooth, evals)):
                    self.fig.data[index].x = xs
                    self.fig.data[index].y = ys

    def flush(self) -> None:
        """Redraw now (tests and the end of a run; normal updates are throttled)."""
        self.throttle.flush_now()

    # ----------------------------------------------------------------- display

    def series(self) -> dict[str, tuple[list[float], list[float]]]:
        out = {}
        for run, raw, smooth, evals in self._snapshot():
            out[f"{run.name} raw"] = (list(raw[0]), list(raw[1]))
            out[run.name] = (list(smooth[0]), list(smooth[1]))
            if evals[0]:
                out[f"{run.name} eval"] = (list(evals[0]), list(evals[1]))
        return out

    def info_html(self) -> str:
        """One line per attached run: its base model, LoRA rank, trainable parameters, server."""
        with self._lock:
            runs = [(run.name, run.facts) for run in self.runs.values() if run.facts]
        return "".join(
            f'<div class="wb-run-facts" style="font-family:monospace;font-size:90%"><b>{html.escape(name)}</b> '
            + " · ".join(f"{html.escape(k)} {html.escape(v)}" for k, v in facts.items()) + "</div>"
            for name, facts in runs)

    def static_html(self) -> str:
        return self.info_html() + render.svg_lines(self.series(), title=f"{self.metric} per step")

    def __repr__(self) -> str:
        lines = [f"LossCurve({self.metric}, {len(self.runs)} run(s))"]
        with self._lock:
            for run in self.runs.values():
                last = f"{run.values[-1]:.4g}" if run.values else "-"
                lines.append(f"  {run.name}: {len(run.values)} points, last {last}, "
                             f"{len(run.eval_values)} eval points")
        return "\n".join(lines)

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.static_html())

    def detach(self) -> None:
        """Stop listening, drawing what has arrived: the figure stays on screen, frozen
        (`%tinker stop` detaches; close() also removes it)."""
        for client, listener in self._attached:
            try:
                client.remove_listener(listener)
            except (AttributeError, ValueError):
                pass
        self._attached.clear()
        self.throttle.flush_now()

    def close(self) -> None:
        """Stop listening and release the FigureWidget (they are not reliably collected)."""
        self.detach()
        self.throttle.cancel()
        for widget in (self.info, self.slider, self.fig, self.widget):
            widget.close()
