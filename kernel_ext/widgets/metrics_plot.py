"""Compare runs: the metrics of up to 4 runs, read from their `metrics.jsonl`, overlaid.

A metrics file has one JSON object per line with a `step` key and metric keys: the recipes'
(workbench.recipes.common.MetricsLog: `loss:sum`, `train/loss_per_token`, `env/reward_mean`,
...) and the tinker-cookbook's (`env/all/reward/total`, `train/loss`, ...) alike. A line
without `step` is placed at its line number; non-numeric values are skipped. One panel per
metric, one colour per run: raw values faint, their EMA (debiased, `common.ema`) bold, with
a smoothing slider that redraws the smoothed lines.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any, Optional, Sequence

from .. import render
from .common import ema, smoothing_slider, widget_bundle

MAX_RUNS = 4
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
# The metric shown when none is named: the first of these every run has.
PREFERRED = ("env/all/reward/total", "env/reward_mean", "train/loss_per_token", "train/mean_nll",
             "train/loss", "loss:sum")


def metrics_file(path: str) -> str:
    """PATH itself, or PATH/metrics.jsonl for a directory; FileNotFoundError if neither."""
    path = os.path.expanduser(path)
    candidate = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"no metrics file at {path!r} (expected a metrics.jsonl file or a "
                                "directory holding one)")
    return candidate


def load_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (PATH or PATH/metrics.jsonl); ValueError on a bad line."""
    file = metrics_file(path)
    rows = []
    with open(file) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file} line {n} is not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file} line {n} is not a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"{file} has no rows")
    return rows


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_names(rows: Sequence[dict]) -> list[str]:
    """The numeric keys of the rows (step excluded), sorted."""
    return sorted({k for row in rows for k, v in row.items() if k != "step" and _number(v) is not None})


def series(rows: Sequence[dict], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric: rows without it skipped, a row without step at its line."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = _number(row.get(metric))
        if value is None:
            continue
        step = _number(row.get("step"))
        xs.append(step if step is not None else float(i))
        ys.append(value)
    return xs, ys


def run_names(paths: Sequence[str]) -> list[str]:
    """A short name per path: its directory's name (a metrics.jsonl's parent), else the file
    name; the paths as given where the short names collide."""
    def short(path: str) -> str:
        path = os.path.normpath(os.path.expanduser(path))
        if os.path.basename(path) == "metrics.jsonl":
            path = os.path.dirname(path) or "."
        return os.path.basename(os.path.abspath(path))

    names = [short(p) for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def default_metric(runs: dict[str, list[dict]]) -> str:
    names = [set(metric_names(rows)) for rows in runs.values()]
    common = set.intersection(*names) if names else set()
    pool = common or set.union(*names)
    for metric in PREFERRED:
        if metric in pool:
            return metric
    if not pool:
        raise ValueError("the runs have no numeric metrics")
    return sorted(pool)[0]


class MetricsPlot:
    """`MetricsPlot({"run a": rows, "run b": rows}, ["train/loss"], smoothing=0.6)`."""

    def __init__(self, runs: dict[str, list[dict]], metrics: Optional[Sequence[str]] = None,
                 smoothing: float = 0.6, sources: Optional[dict[str, str]] = None):
        import ipywidgets as w
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        if not runs:
            raise ValueError("no runs to plot")
        if len(runs) > MAX_RUNS:
            raise ValueError(f"at most {MAX_RUNS} runs at a time, got {len(runs)}")
        ema([], smoothing)  # validates smoothing
        self.runs = dict(runs)
        self.metrics = list(metrics) if metrics else [default_metric(self.runs)]
        available = sorted({m for rows in self.runs.values() for m in metric_names(rows)})
        for metric in self.metrics:
            if metric not in available:
                raise ValueError(f"no run has metric {metric!r}; available: {', '.join(available)}")
        self.smoothing = smoothing
        self.sources = sources or {}
        # (run, metric) -> (steps, raw values); raw is fixed, the smoothed line follows the slider.
        self.data = {(run, m): series(rows, m) for run, rows in self.runs.items() for m in self.metrics}
        base = make_subplots(rows=len(self.metrics), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                             subplot_titles=self.metrics)
        base.update_layout(height=120 + 220 * len(self.metrics), margin=dict(l=50, r=10, t=40, b=30))
        self.fig = go.FigureWidget(base)
        self.traces: dict[tuple[str, str], tuple[int, int]] = {}  # (run, metric) -> raw, smoothed
        for row, metric in enumerate(self.metrics, start=1):
            for i, run in enumerate(self.runs):
                xs, ys = self.data[(run, metric)]
                colour = PALETTE[i % len(PALETTE)]
                first = len(self.fig.data)
                self.fig.add_scatter(x=xs, y=ys, name=f"{run} raw", mode="lines", opacity=0.3,
                                     line=dict(width=1, color=colour), legendgroup=run, showlegend=False,
                                     row=row, col=1)
                self.fig.add_scatter(x=xs, y=ema(ys, smoothing), name=run, mode="lines",
                                     line=dict(width=2.5, color=colour), legendgroup=run, showlegend=row == 1,
                                     row=row, col=1)
                self.traces[(run, metric)] = (first, first + 1)
        self.fig.update_xaxes(title_text="step", row=len(self.metrics), col=1)
        self.header = w.HTML(self.header_html())
        self.header.add_class("wb-plot-runs")
        self.slider = smoothing_slider(smoothing)
        self.slider.observe(lambda change: self.set_smoothing(change["new"]), names="value")
        self.widget = w.VBox([self.header, self.slider, self.fig])

    def set_smoothing(self, smoothing: float) -> None:
        """Redraw every smoothed line with this EMA smoothing (what the slider calls)."""
        ema([], smoothing)
        self.smoothing = smoothing
        if self.slider.value != smoothing:
            self.slider.value = smoothing  # its observer calls back here with the same value
        with self.fig.batch_update():
            for key, (_, smooth) in self.traces.items():
                self.fig.data[smooth].y = ema(self.data[key][1], smoothing)

    def smoothed(self, run: str, metric: str) -> list[float]:
        """The smoothed line of `run`'s `metric` as drawn."""
        return list(self.fig.data[self.traces[(run, metric)][1]].y)

    def header_html(self) -> str:
        items = []
        for i, run in enumerate(self.runs):
            source = self.sources.get(run, "")
            items.append(f'<span style="color:{PALETTE[i % len(PALETTE)]}">&#9632;</span> <b>{html.escape(run)}</b>'
                         + (f' <span style="color:#777">{html.escape(source)}</span>' if source else "")
                         + f" ({len(self.runs[run])} rows)")
        return '<div style="font-family:monospace">' + " &nbsp; ".join(items) + "</div>"

    def static_html(self) -> str:
        return self.header_html() + "".join(
            render.svg_lines({run: (self.data[(run, m)][0], ema(self.data[(run, m)][1], self.smoothing))
                              for run in self.runs}, title=f"{m} (smoothing {self.smoothing:.2f})")
            for m in self.metrics)

    def __repr__(self) -> str:
        lines = [f"MetricsPlot({', '.join(self.metrics)}; smoothing {self.smoothing:.2f})"]
        for run in self.runs:
            last = {m: self.data[(run, m)][1][-1] for m in self.metrics if self.data[(run, m)][1]}
            lines.append(f"  {run}: " + ", ".join(f"{m} last {v:.4g}" for m, v in last.items()))
        return "\n".join(lines)

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.static_html())

    def detach(self) -> None:
        """Nothing to stop: the plot reads files once and listens to nothing."""

    def close(self) -> None:
        for widget in (self.header, self.slider, self.fig, self.widget):
            widget.close()
