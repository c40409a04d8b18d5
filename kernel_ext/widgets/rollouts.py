"""Rollout dashboard: RL rollout groups -> samples with reward, advantage, logprob strips.

A group is a `workbench.rl` TrajectoryGroup, anything with `samples` (attribute or key) or
a plain list of samples; a sample
is a dict or object with `reward` and optionally `advantage`, `tokens`, `logprobs`, `text`.
A missing advantage is reward minus the group's mean reward (what GRPO-style training uses
before any normalisation). Groups whose rewards are all equal carry no learning signal
(every advantage is 0) and are flagged.
"""

from __future__ import annotations

import html
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from .. import render
from .common import Throttle, widget_bundle

SHOWN_GROUPS = 30  # the newest groups rendered in full; older ones only count in the summary


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


@dataclass(frozen=True)
class Sample:
    reward: float
    advantage: float
    logprobs: Optional[list[float]] = None
    tokens: Optional[list[int]] = None
    text: Optional[str] = None


@dataclass(frozen=True)
class Group:
    index: int
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def mean_reward(self) -> float:
        return statistics.fmean(self.rewards)

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) - min(self.rewards) <= 1e-12


def _from_trajectory_group(raw: Any) -> list[dict]:
    # workbench.rl's TrajectoryGroup: per trajectory, its total reward and every action's
    # tokens and sampler logprobs, in order.
    samples = []
    for traj, reward in zip(raw.trajectories, raw.total_rewards()):
        tokens = [t for tr in traj.transitions for t in tr.ac.tokens]
        logprobs = [lp for tr in traj.transitions for lp in tr.ac.logprobs]
        samples.append({"reward": reward, "tokens": tokens, "logprobs": logprobs})
    return samples


def to_group(raw: Any, index: int) -> Group:
    """Normalise one rollout group (see the module docstring); raises on missing rewards."""
    if hasattr(raw, "trajectories") and callable(getattr(raw, "total_rewards", None)):
        raw = {"samples": _from_trajectory_group(raw)}
    samples = _get(raw, "samples", None)
    if samples is None:
        samples = _get(raw, "trajectories", None)
    if samples is None and isinstance(raw, (list, tuple)):
        samples = raw
    if not samples:
        raise ValueError(f"rollout group {index} has no samples (expected .samples or a list)")
    rewards = []
    for j, s in enumerate(samples):
        r = _get(s, "reward", _get(s, "total_reward"))
        if r is None:
            raise ValueError(f"rollout group {index} sample {j} has no reward")
        rewards.append(float(r))
    mean = statistics.fmean(rewards)
    out = []
    for s, r in zip(samples, rewards):
        adv = _get(s, "advantage")
        lps = _get(s, "logprobs")
        toks = _get(s, "tokens")
        out.append(Sample(reward=r, advantage=float(adv) if adv is not None else r - mean,
                          logprobs=None if lps is None else [float(v) for v in lps],
                          tokens=None if toks is None else [int(t) for t in toks],
                          text=_get(s, "text")))
    return Group(index, out)


class RolloutDashboard:
    def __init__(self, tokenizer: Any = None):
        import ipywidgets as w
        import plotly.graph_objects as go

        self.tokenizer = tokenizer
        self.groups: list[Group] = []
        self._lock = threading.Lock()
        self.summary = w.HTML()
        self.summary.add_class("wb-rollout-summary")
        # One HTML widget per shown group, newest first. Groups never change once added, so a
        # redraw renders only the groups it has not seen and moves the others' widgets: the
        # browser is sent the new groups' HTML, not the whole list again.
        self.body = w.VBox(layout=w.Layout(max_height="420px", overflow="auto"))
        self.body.add_class("wb-rollouts")
        self._group_widgets: dict[int, Any] = {}  # shown group's index -> its HTML widget
        self.fig = go.FigureWidget(layout=dict(height=220, margin=dict(l=40, r=10, t=30, b=30),
                                               title=dict(text="mean reward per group")))
        self.fig.add_scatter(name="mean reward", mode="lines+markers")
        self.fig.add_scatter(name="zero variance", mode="markers", marker=dict(symbol="x", size=9))
        self.widget = w.VBox([self.summary, self.fig, self.body])
        self.throttle = Throttle(self._redraw)
        self._redraw()

    def add_group(self, raw: Any) -> Group:
        with self._lock:
            group = to_group(raw, len(self.groups))
            self.groups.append(group)
        self.throttle.request()
        return group

    def extend(self, groups: Iterable[Any]) -> None:
        for raw in groups:
            self.add_group(raw)

    def feed(self, stream: Iterable[Any]) -> threading.Thread:
        """Consume a (possibly slow) iterator of groups on a background thread."""
        def run() -> None:
            try:
                self.extend(stream)
            finally:
                self.throttle.flush_now()

        thread = threading.Thread(target=run, name="workbench-rollouts", daemon=True)
        thread.start()
        return thread

    # ----------------------------------------------------------------- drawing

    def stats(self) -> dict[str, float]:
        with self._lock:
            groups = list(self.groups)
        samples = [s for g in groups for s in g.samples]
        return {
            "groups": float(len(groups)),
            "samples": float(len(samples)),
            "mean_reward": statistics.fmean([s.reward for s in samples]) if samples else 0.0,
            "zero_variance_groups": float(sum(g.zero_variance for g in groups)),
        }

    def summary_html(self) -> str:
        s = self.stats()
        frac = s["zero_variance_groups"] / s["groups"] if s["groups"] else 0.0
        return (f'<div style="font-family:monospace">groups {int(s["groups"])} · samples '
                f'{int(s["samples"])} · mean reward {s["mean_reward"]:.4g} · zero-variance groups '
                f'<b class="wb-zero-var-count">{int(s["zero_variance_groups"])}</b> ({frac:.0%})</div>')

    def group_html(self, group: Group) -> str:
        flag = (' <span class="wb-zero-variance" style="color:#fff;background:#c60;padding:0 4px" '
                'title="all rewards equal: every advantage is 0, no learning signal">zero variance</span>'
                if group.zero_variance else "")
        rows = []
        for j, s in enumerate(group.samples):
            texts = ([render.token_text(self.tokenizer, t) for t in s.tokens]
                     if self.tokenizer is not None and s.tokens and s.logprobs
                     and len(s.tokens) == len(s.logprobs) else None)
            strip = render.heat_strip_html(s.logprobs, texts) if s.logprobs else ""
            text = f' <span style="color:#555">{html.escape(s.text[:120])}</span>' if s.text else ""
            rows.append(f'<div class="wb-sample" style="font-family:monospace">#{j} reward {s.reward:.4g} '
                        f'advantage {s.advantage:+.4g} {strip}{text}</div>')
        return (f'<div class="wb-group" style="margin:4px 0;border-left:3px solid #ccc;padding-left:6px">'
                f'<b>group {group.index}</b> mean reward {group.mean_reward:.4g}{flag}{"".join(rows)}</div>')

    @property
    def body_html(self) -> str:
        """The group list's HTML as shown (newest group first)."""
        return "".join(child.value for child in self.body.children)

    def _sync_group_widgets(self, shown: Sequence[Group]) -> None:
        """Body children = `shown` newest first; new groups get a widget, ones scrolled out
        of the window are closed and forgotten (groups only append, so they never return)."""
        import ipywidgets as w

        keep = {g.index for g in shown}
        for index in [i for i in self._group_widgets if i not in keep]:
            self._group_widgets.pop(index).close()
        for g in shown:
            if g.index not in self._group_widgets:
                self._group_widgets[g.index] = w.HTML(self.group_html(g))
        children = tuple(self._group_widgets[g.index] for g in reversed(shown))
        if children != self.body.children:
            self.body.children = children

    def _redraw(self) -> None:
        with self._lock:
            groups = list(self.groups)
        self.summary.value = self.summary_html()
        self._sync_group_widgets(groups[-SHOWN_GROUPS:])
        with self.fig.batch_update():
            self.fig.data[0].x = [g.index for g in groups]
            self.fig.data[0].y = [g.mean_reward for g in groups]
            zero = [g for g in groups if g.zero_variance]
            self.fig.data[1].x = [g.index for g in zero]
            self.fig.data[1].y = [g.mean_reward for g in zero]

    def flush(self) -> None:
        self.throttle.flush_now()

    def static_html(self) -> str:
        with self._lock:
            groups = list(self.groups)
        plot = render.svg_lines({"mean reward": ([g.index for g in groups], [g.mean_reward for g in groups])},
                                title="mean reward per group")
        return self.summary_html() + plot + "".join(self._shown_html(g) for g in groups[-SHOWN_GROUPS:])

    def _shown_html(self, group: Group) -> str:
        """The group's HTML from its widget when a redraw made one, else rendered now (read
        only: the widgets are changed by redraws alone, which the throttle runs one at a time)."""
        widget = self._group_widgets.get(group.index)
        return widget.value if widget is not None else self.group_html(group)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"RolloutDashboard({int(s['groups'])} groups, {int(s['samples'])} samples, mean reward "
                f"{s['mean_reward']:.4g}, {int(s['zero_variance_groups'])} zero-variance groups)")

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.static_html())

    def detach(self) -> None:
        """Draw what has arrived; the dashboard stays on screen (it listens to nothing)."""
        self.throttle.flush_now()

    def close(self) -> None:
        self.throttle.cancel()
        for widget in (*self._group_widgets.values(), self.summary, self.fig, self.body, self.widget):
            widget.close()


def groups_from(value: Any) -> Sequence[Any]:
    """A list of groups from a list of groups, one group (a list of samples) or `.groups`."""
    groups = _get(value, "groups", None)
    if groups is not None:
        return list(groups)
    if isinstance(value, (list, tuple)):
        if value and _get(value[0], "reward", _get(value[0], "total_reward")) is not None:
            return [list(value)]  # a list of samples is one group
        return list(value)
    raise TypeError(f"rollouts needs a list of rollout groups, got {type(value).__name__}")
