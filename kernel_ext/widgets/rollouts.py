"""Rollout dashboard: RL rollout groups -> samples with reward, advantage, logprob strips,
and from its curves back into the data.

A group is a `workbench.rl` TrajectoryGroup, anything with `samples` (attribute or key) or
a plain list of samples; a sample
is a dict or object with `reward` and optionally `advantage`, `tokens`, `logprobs` (the
sampler's), `trainer_logprobs` (the trainer's for the same tokens) and `text`.
A missing advantage is reward minus the group's mean reward (what GRPO-style training uses
before any normalisation). Groups whose rewards are all equal carry no learning signal
(every advantage is 0) and are flagged.

Steps: every group belongs to an RL step: its own `step` key, else `extend(groups, step=i)`,
else one step per `extend` call (0, 1, 2, ...; `add_group` joins the latest step).

From a curve into the data: clicking a bar of the reward histogram filters the list to the
samples whose reward lies in that bin (`filter_reward(lo, hi)`), clicking a step of the
per-step reward or KL chart shows that step's groups (`show_step(i)`); "clear" (or
`clear_filter()`) shows everything again.

Sampler-vs-trainer KL: per step, the mean over sampled tokens of logp_sampler -
logp_trainer, from samples that carry both logprobs or from `add_kl(step, value)` (e.g.
`workbench.rl.sampler_trainer_kl`). On-policy it stays near 0; |KL| above `kl_threshold`
raises a warning banner (class `wb-kl-warning`).
"""

from __future__ import annotations

import html
import math
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from .. import render
from .common import Throttle, widget_bundle

SHOWN_GROUPS = 30  # the newest groups rendered in full; older ones only count in the summary
MAX_BINS = 10  # reward histogram bins (fewer when the rewards take fewer distinct values)
KL_THRESHOLD = 1e-2  # healthy |sampler - trainer KL| of an on-policy loop (numerics only)


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
    trainer_logprobs: Optional[list[float]] = None  # the trainer's, aligned with logprobs


@dataclass(frozen=True)
class Group:
    index: int
    samples: list[Sample]
    step: int = 0

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


def _floats(values: Any) -> Optional[list[float]]:
    return None if values is None else [float(v) for v in values]


def to_group(raw: Any, index: int, step: int = 0) -> Group:
    """Normalise one rollout group (see the module docstring); raises on missing rewards.
    `step` is used unless the group carries its own `step`."""
    own_step = _get(raw, "step") if not isinstance(raw, (list, tuple)) else None
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
    for j, (s, r) in enumerate(zip(samples, rewards)):
        adv = _get(s, "advantage")
        toks = _get(s, "tokens")
        lps, trainer = _floats(_get(s, "logprobs")), _floats(_get(s, "trainer_logprobs"))
        if trainer is not None and (lps is None or len(lps) != len(trainer)):
            raise ValueError(f"rollout group {index} sample {j}: trainer_logprobs has {len(trainer)} entries "
                             f"but logprobs has {'none' if lps is None else len(lps)}")
        out.append(Sample(reward=r, advantage=float(adv) if adv is not None else r - mean, logprobs=lps,
                          tokens=None if toks is None else [int(t) for t in toks], text=_get(s, "text"),
                          trainer_logprobs=trainer))
    return Group(index, out, int(own_step) if own_step is not None else int(step))


# ------------------------------------------------------------------------ statistics

@dataclass(frozen=True)
class RewardBin:
    lo: float
    hi: float
    closed: bool = False  # True: [lo, hi] (the last bin), else [lo, hi)

    def __contains__(self, reward: float) -> bool:
        return self.lo <= reward < self.hi or (self.closed and reward == self.hi)

    @property
    def label(self) -> str:
        return f"[{self.lo:.4g}, {self.hi:.4g}{']' if self.closed else ')'}"


def reward_bins(rewards: Sequence[float], max_bins: int = MAX_BINS) -> list[RewardBin]:
    """Equal-width bins over [min, max]: as many as distinct rewards, at most max_bins; the
    last bin is closed so the maximum falls in it. One closed bin [v, v] if all are equal."""
    if not rewards:
        return []
    lo, hi = min(rewards), max(rewards)
    if hi - lo <= 1e-12:
        return [RewardBin(lo, hi, True)]
    n = min(max_bins, len(set(rewards)))
    edges = [lo + (hi - lo) * i / n for i in range(n)] + [hi]
    return [RewardBin(edges[i], edges[i + 1], i == n - 1) for i in range(n)]


def step_kl_from_samples(groups: Sequence[Group]) -> dict[int, float]:
    """Per step: mean over sampled tokens of logp_sampler - logp_trainer, over the samples
    that carry trainer_logprobs."""
    sums: dict[int, list[float]] = {}
    for g in groups:
        for s in g.samples:
            if s.trainer_logprobs is not None and s.logprobs is not None and s.logprobs:
                acc = sums.setdefault(g.step, [0.0, 0.0])
                acc[0] += sum(a - b for a, b in zip(s.logprobs, s.trainer_logprobs))
                acc[1] += len(s.logprobs)
    return {step: total / n for step, (total, n) in sums.items() if n}


@dataclass(frozen=True)
class View:
    """What the list shows: one step's groups and/or the samples in one reward bin."""

    step: Optional[int] = None
    reward: Optional[RewardBin] = None

    @property
    def active(self) -> bool:
        return self.step is not None or self.reward is not None

    def samples(self, group: Group) -> list[int]:
        """Indices of the group's samples in this view (empty: the group is not shown)."""
        if self.step is not None and group.step != self.step:
            return []
        return [j for j, s in enumerate(group.samples) if self.reward is None or s.reward in self.reward]

    @property
    def label(self) -> str:
        parts = ([f"step {self.step}"] if self.step is not None else []) + (
            [f"reward in {self.reward.label}"] if self.reward is not None else [])
        return "filter: " + " · ".join(parts) if parts else ""


class RolloutDashboard:
    def __init__(self, tokenizer: Any = None, kl_threshold: float = KL_THRESHOLD):
        import ipywidgets as w
        import plotly.graph_objects as go

        if not kl_threshold > 0:
            raise ValueError(f"kl_threshold must be > 0, got {kl_threshold}")
        self.tokenizer = tokenizer
        self.kl_threshold = kl_threshold
        self.groups: list[Group] = []
        self.view = View()
        self._kl_added: dict[int, float] = {}  # step -> KL from add_kl
        self._last_step: Optional[int] = None  # the step of the newest group
        self._bins: list[RewardBin] = []  # the histogram's bins as last drawn (clicks index them)
        self._lock = threading.Lock()
        self.summary = w.HTML()
        self.summary.add_class("wb-rollout-summary")
        self.filter_label = w.HTML()
        self.filter_label.add_class("wb-rollout-filter")
        self.clear_button = w.Button(description="clear", tooltip="show every group again",
                                     layout=w.Layout(width="auto"))
        self.clear_button.on_click(lambda _: self.clear_filter())
        self.filter_bar = w.HBox([self.filter_label, self.clear_button], layout=w.Layout(display="none"))
        self.kl_banner = w.HTML()
        # One HTML widget per shown group, newest first. Groups never change once added, so a
        # redraw renders only the groups it has not seen and moves the others' widgets: the
        # browser is sent the new groups' HTML, not the whole list again. Keyed by (view, index):
        # a filtered view renders its own (shorter) groups.
        self.body = w.VBox(layout=w.Layout(max_height="420px", overflow="auto"))
        self.body.add_class("wb-rollouts")
        self._group_widgets: dict[tuple[View, int], Any] = {}
        small = dict(height=220, width=470, margin=dict(l=40, r=10, t=30, b=30))
        self.fig = go.FigureWidget(layout=dict(**small, title=dict(text="mean reward per group")))
        self.fig.add_scatter(name="mean reward", mode="lines+markers")
        self.fig.add_scatter(name="zero variance", mode="markers", marker=dict(symbol="x", size=9))
        self.hist_fig = go.FigureWidget(layout=dict(**small, title=dict(text="rewards (click a bar to filter)"),
                                                    bargap=0.05, showlegend=False))
        self.hist_fig.add_bar(name="samples")
        self.hist_fig.data[0].on_click(self._on_bin_click)
        self.step_fig = go.FigureWidget(layout=dict(**small, title=dict(text="mean reward per step (click a step)"),
                                                    showlegend=False, xaxis=dict(title=dict(text="step"))))
        self.step_fig.add_scatter(name="mean reward", mode="lines+markers")
        self.step_fig.data[0].on_click(self._on_step_click)
        self.kl_fig = go.FigureWidget(layout=dict(**small, title=dict(text="sampler - trainer KL per step"),
                                                  showlegend=False, xaxis=dict(title=dict(text="step"))))
        self.kl_fig.add_scatter(name="KL", mode="lines+markers")
        self.kl_fig.data[0].on_click(self._on_step_click)
        self._draw_kl_range()
        self._rows = (w.HBox([self.hist_fig, self.step_fig]), w.HBox([self.fig, self.kl_fig]))
        self.widget = w.VBox([self.summary, self.filter_bar, self.kl_banner, *self._rows, self.body])
        self.throttle = Throttle(self._redraw)
        self._redraw()

    # ----------------------------------------------------------------- feeding

    def add_group(self, raw: Any, step: Optional[int] = None) -> Group:
        """One group, at `step` (default: its own `step`, else the newest group's step)."""
        with self._lock:
            if step is None:
                step = self._last_step if self._last_step is not None else 0
            group = to_group(raw, len(self.groups), step)
            self.groups.append(group)
            self._last_step = group.step
        self.throttle.request()
        return group

    def extend(self, groups: Iterable[Any], step: Optional[int] = None) -> None:
        """Groups of one RL step: `step`, by default the one after the newest group's."""
        if step is None:
            with self._lock:
                step = self._last_step + 1 if self._last_step is not None else 0
        for raw in groups:
            self.add_group(raw, step)

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

    def add_kl(self, step: int, value: float) -> None:
        """The sampler-vs-trainer KL of `step` (e.g. workbench.rl.sampler_trainer_kl); it
        replaces what the step's samples give. Non-finite values are ignored."""
        if not math.isfinite(float(value)):
            return
        with self._lock:
            self._kl_added[int(step)] = float(value)
        self.throttle.request()

    # ----------------------------------------------------------------- filters

    def filter_reward(self, lo: float, hi: float, include_hi: bool = False) -> None:
        """Show only the samples with lo <= reward < hi (<= hi with include_hi)."""
        self._set_view(View(self.view.step, RewardBin(float(lo), float(hi), include_hi)))

    def show_step(self, step: Optional[int]) -> None:
        """Show only the groups of RL step `step` (None: every step)."""
        self._set_view(View(None if step is None else int(step), self.view.reward))

    def clear_filter(self) -> None:
        self._set_view(View())

    def _set_view(self, view: View) -> None:
        with self._lock:
            self.view = view
        self.throttle.flush_now()

    def _on_bin_click(self, trace: Any, points: Any, state: Any = None) -> None:
        if points.point_inds:  # plotly calls every trace's handler, most with no points
            with self._lock:
                b = self._bins[points.point_inds[0]]
            self.filter_reward(b.lo, b.hi, b.closed)

    def _on_step_click(self, trace: Any, points: Any, state: Any = None) -> None:
        if points.point_inds:
            self.show_step(int(round(trace.x[points.point_inds[0]])))

    # ----------------------------------------------------------------- numbers

    def stats(self) -> dict[str, float]:
        with self._lock:
            groups = list(self.groups)
        samples = [s for g in groups for s in g.samples]
        return {
            "groups": float(len(groups)),
            "samples": float(len(samples)),
            "mean_reward": statistics.fmean([s.reward for s in samples]) if samples else 0.0,
            "zero_variance_groups": float(sum(g.zero_variance for g in groups)),
            "steps": float(len({g.step for g in groups})),
        }

    def step_rewards(self) -> dict[int, float]:
        """Per step, the mean reward of its samples."""
        with self._lock:
            groups = list(self.groups)
        by_step: dict[int, list[float]] = {}
        for g in groups:
            by_step.setdefault(g.step, []).extend(g.rewards)
        return {step: statistics.fmean(v) for step, v in sorted(by_step.items())}

    def step_kl(self) -> dict[int, float]:
        """Per step, the sampler-vs-trainer KL: add_kl's value, else the samples'."""
        with self._lock:
            groups, added = list(self.groups), dict(self._kl_added)
        return dict(sorted({**step_kl_from_samples(groups), **added}.items()))

    def kl_out_of_range(self) -> dict[int, float]:
        return {s: v for s, v in self.step_kl().items() if abs(v) > self.kl_threshold}

    def histogram(self) -> list[tuple[RewardBin, int]]:
        """(bin, samples in it) over the samples of the shown step (all steps if none)."""
        with self._lock:
            groups, step = list(self.groups), self.view.step
        rewards = [r for g in groups if step is None or g.step == step for r in g.rewards]
        return [(b, sum(r in b for r in rewards)) for b in reward_bins(rewards)]

    def set_kl_threshold(self, threshold: float) -> None:
        if not threshold > 0:
            raise ValueError(f"kl_threshold must be > 0, got {threshold}")
        self.kl_threshold = threshold
        self._draw_kl_range()
        self.throttle.flush_now()

    # ----------------------------------------------------------------- drawing

    def summary_html(self) -> str:
        s = self.stats()
        frac = s["zero_variance_groups"] / s["groups"] if s["groups"] else 0.0
        return (f'<div style="font-family:monospace">steps {int(s["steps"])} · groups {int(s["groups"])} · '
                f'samples {int(s["samples"])} · mean reward {s["mean_reward"]:.4g} · zero-variance groups '
                f'<b class="wb-zero-var-count">{int(s["zero_variance_groups"])}</b> ({frac:.0%})</div>')

    def kl_warning_html(self) -> str:
        """The warning banner's HTML ('' while every step's |KL| is within the threshold)."""
        bad = self.kl_out_of_range()
        if not bad:
            return ""
        listed = ", ".join(f"step {s} ({v:+.3g})" for s, v in list(bad.items())[-5:])
        return ('<div class="wb-kl-warning" style="background:#fdecea;color:#8a1c1c;border-left:4px solid '
                f'#d62728;padding:4px 8px;font-family:monospace">&#9888; sampler-trainer KL outside '
                f'&plusmn;{self.kl_threshold:.3g} at {len(bad)} step(s): {html.escape(listed)}. The sampler '
                'is not sampling from the weights being trained: stale sampler weights, an off-policy '
                'step, or sampler numerics that differ from the trainer\'s.</div>')

    def group_html(self, group: Group, keep: Optional[Sequence[int]] = None) -> str:
        """A group's HTML; `keep`: the indices of the samples to list (None: all)."""
        flag = (' <span class="wb-zero-variance" style="color:#fff;background:#c60;padding:0 4px" '
                'title="all rewards equal: every advantage is 0, no learning signal">zero variance</span>'
                if group.zero_variance else "")
        keep = range(len(group.samples)) if keep is None else keep
        rows = []
        for j in keep:
            s = group.samples[j]
            texts = ([render.token_text(self.tokenizer, t) for t in s.tokens]
                     if self.tokenizer is not None and s.tokens and s.logprobs
                     and len(s.tokens) == len(s.logprobs) else None)
            strip = render.heat_strip_html(s.logprobs, texts) if s.logprobs else ""
            text = f' <span style="color:#555">{html.escape(s.text[:120])}</span>' if s.text else ""
            rows.append(f'<div class="wb-sample" style="font-family:monospace">#{j} reward {s.reward:.4g} '
                        f'advantage {s.advantage:+.4g} {strip}{text}</div>')
        part = (f' <span style="color:#777">({len(keep)} of {len(group.samples)} samples in the filter)</span>'
                if len(keep) != len(group.samples) else "")
        return (f'<div class="wb-group" style="margin:4px 0;border-left:3px solid #ccc;padding-left:6px">'
                f'<b>group {group.index}</b> step {group.step} mean reward {group.mean_reward:.4g}{flag}{part}'
                f'{"".join(rows)}</div>')

    @property
    def body_html(self) -> str:
        """The group list's HTML as shown (newest group first)."""
        return "".join(child.value for child in self.body.children)

    def _shown(self, groups: Sequence[Group], view: View) -> list[tuple[Group, Optional[list[int]]]]:
        """The newest SHOWN_GROUPS groups in `view`, with their samples in it (None: all)."""
        if not view.active:
            return [(g, None) for g in groups[-SHOWN_GROUPS:]]
        picked = [(g, keep) for g in groups for keep in [view.samples(g)] if keep]
        return picked[-SHOWN_GROUPS:]

    def _render(self, group: Group, keep: Optional[list[int]]) -> str:
        return self.group_html(group) if keep is None else self.group_html(group, keep)

    def _sync_group_widgets(self, shown: Sequence[tuple[Group, Optional[list[int]]]], view: View) -> None:
        """Body children = `shown` newest first; new groups get a widget, ones scrolled out of
        the window (or out of the view) are closed and forgotten."""
        import ipywidgets as w

        keep = {(view, g.index) for g, _ in shown}
        for key in [k for k in self._group_widgets if k not in keep]:
            self._group_widgets.pop(key).close()
        for g, samples in shown:
            if (view, g.index) not in self._group_widgets:
                self._group_widgets[(view, g.index)] = w.HTML(self._render(g, samples))
        children = tuple(self._group_widgets[(view, g.index)] for g, _ in reversed(shown))
        if children != self.body.children:
            self.body.children = children

    def _draw_kl_range(self) -> None:
        t = self.kl_threshold
        line = dict(type="line", xref="paper", x0=0, x1=1, yref="y", line=dict(dash="dash", color="#d62728"))
        self.kl_fig.layout.shapes = [dict(line, y0=t, y1=t), dict(line, y0=-t, y1=-t)]

    def _redraw(self) -> None:
        with self._lock:
            groups, view = list(self.groups), self.view
        shown = self._shown(groups, view)
        self.summary.value = self.summary_html()
        self.filter_label.value = (f'<span style="font-family:monospace">{html.escape(view.label)} · '
                                   f'{len(shown)} groups shown</span>' if view.active else "")
        self.filter_bar.layout.display = "flex" if view.active else "none"
        self.kl_banner.value = self.kl_warning_html()
        self._sync_group_widgets(shown, view)
        hist = self.histogram()
        with self._lock:
            self._bins = [b for b, _ in hist]
        steps, kl = self.step_rewards(), self.step_kl()
        with self.hist_fig.batch_update():
            of = "" if view.step is None else f" of step {view.step}"
            self.hist_fig.layout.title.text = f"rewards{of} (click a bar to filter)"
            bar = self.hist_fig.data[0]
            bar.x = [(b.lo + b.hi) / 2 for b, _ in hist]
            bar.y = [n for _, n in hist]
            bar.width = [(b.hi - b.lo) or 0.5 for b, _ in hist]
            bar.hovertext = [f"reward in {b.label}: {n} samples" for b, n in hist]
            bar.marker.color = ["#d62728" if view.reward == b else "#1f77b4" for b, _ in hist]
        with self.step_fig.batch_update():
            self.step_fig.data[0].x = list(steps)
            self.step_fig.data[0].y = list(steps.values())
            self.step_fig.data[0].marker.size = [12 if s == view.step else 6 for s in steps]
        with self.kl_fig.batch_update():
            self.kl_fig.data[0].x = list(kl)
            self.kl_fig.data[0].y = list(kl.values())
            self.kl_fig.data[0].marker.color = ["#d62728" if abs(v) > self.kl_threshold else "#1f77b4"
                                                for v in kl.values()]
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
            groups, view = list(self.groups), self.view
        plots = render.svg_lines({"mean reward": ([g.index for g in groups], [g.mean_reward for g in groups])},
                                 title="mean reward per group")
        steps = self.step_rewards()
        if len(steps) > 1:
            plots += render.svg_lines({"mean reward": (list(steps), list(steps.values()))},
                                      title="mean reward per step")
        kl = self.step_kl()
        if kl:
            plots += render.svg_lines({"KL": (list(kl), list(kl.values()))}, title="sampler - trainer KL per step")
        label = f'<div class="wb-rollout-filter">{html.escape(view.label)}</div>' if view.active else ""
        return (self.summary_html() + label + self.kl_warning_html() + plots
                + "".join(self._shown_html(g, keep, view) for g, keep in self._shown(groups, view)))

    def _shown_html(self, group: Group, keep: Optional[list[int]], view: View) -> str:
        """The group's HTML from its widget when a redraw made one, else rendered now (read
        only: the widgets are changed by redraws alone, which the throttle runs one at a time)."""
        widget = self._group_widgets.get((view, group.index))
        return widget.value if widget is not None else self._render(group, keep)

    def __repr__(self) -> str:
        s = self.stats()
        bad = self.kl_out_of_range()
        warn = f", KL out of range at steps {sorted(bad)}" if bad else ""
        return (f"RolloutDashboard({int(s['groups'])} groups, {int(s['samples'])} samples, mean reward "
                f"{s['mean_reward']:.4g}, {int(s['zero_variance_groups'])} zero-variance groups{warn})")

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.static_html())

    def detach(self) -> None:
        """Draw what has arrived; the dashboard stays on screen (it listens to nothing)."""
        self.throttle.flush_now()

    def close(self) -> None:
        self.throttle.cancel()
        for widget in (*self._group_widgets.values(), self.summary, self.filter_label, self.clear_button,
                       self.filter_bar, self.kl_banner, self.fig, self.hist_fig, self.step_fig, self.kl_fig,
                       self.body, *self._rows, self.widget):
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
