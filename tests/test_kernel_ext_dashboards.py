"""From a curve into the data, compare runs, smoothing sliders: the rollout dashboard's reward
histogram / step / KL views, `%tinker plot` and the loss curve's slider, through IPython's
test shell. No server: these views read plain data and files."""

from __future__ import annotations

import json

import pytest
from IPython.core.error import UsageError

from kernel_ext.widgets import LossCurve, RolloutDashboard, ema
from kernel_ext.widgets.rollouts import RewardBin

from conftest import ipython_shell


@pytest.fixture(scope="module")
def ip():
    shell = ipython_shell()
    shell.run_line_magic("load_ext", "kernel_ext")
    return shell


def click(fig, trace: int, index: int) -> None:
    """What the browser sends when point `index` of trace `trace` is clicked: plotly's
    points-callback message, handled by the FigureWidget as a real click is."""
    data = fig.data[trace]
    fig._js2py_pointsCallback = {
        "event_type": "plotly_click", "device_state": None, "selector": None,
        "points": {"xs": [data.x[index]], "ys": [data.y[index]], "point_indexes": [index],
                   "trace_indexes": [trace]},
    }


def shown_groups(dash) -> list[int]:
    """Indices of the groups the list shows, newest first."""
    return [int(c.value.split("</b>")[0].rsplit(" ", 1)[1]) for c in dash.body.children]


# ------------------------------------------------------------------ rollout dashboard

def test_reward_histogram_bins_filter_the_list(ip):
    ip.user_ns["groups"] = [{"samples": [{"reward": 0.0}, {"reward": 1.0}]},
                            {"samples": [{"reward": 1.0}, {"reward": 1.0}]},
                            {"samples": [{"reward": 0.5}, {"reward": 0.0}]}]
    dash = ip.run_line_magic("tinker", "rollouts groups")
    bar = dash.hist_fig.data[0]
    # Three distinct rewards -> three bins over [0, 1], the last one closed.
    assert [b for b, _ in dash.histogram()] == [RewardBin(0.0, 1 / 3), RewardBin(1 / 3, 2 / 3),
                                                RewardBin(2 / 3, 1.0, True)]
    assert list(bar.y) == [2, 1, 3] and dash.filter_bar.layout.display == "none"
    click(dash.hist_fig, 0, 2)  # the bar of rewards in [2/3, 1]
    assert dash.view.reward == RewardBin(2 / 3, 1.0, True)
    assert shown_groups(dash) == [1, 0]  # group 2 has no reward in the bin
    assert "(1 of 2 samples in the filter)" in dash.body.children[1].value
    assert "#0 reward 0 " not in dash.body.children[1].value  # group 0's reward-0 sample is hidden
    assert dash.filter_bar.layout.display == "flex"
    assert "filter: reward in [0.6667, 1]" in dash.filter_label.value
    assert list(bar.marker.color) == ["#1f77b4", "#1f77b4", "#d62728"]  # the chosen bin stands out
    dash.clear_button.click()
    assert dash.view.reward is None and shown_groups(dash) == [2, 1, 0]
    assert dash.filter_bar.layout.display == "none"
    dash.filter_reward(0.0, 0.5)  # half-open: 0.5 itself is out
    assert shown_groups(dash) == [2, 0]
    assert "#1 reward 0 " in dash.body.children[0].value and "#0 reward 0.5" not in dash.body.children[0].value
    assert "filter: reward in [0, 0.5)" in dash.static_html()
    dash.clear_filter()
    dash.close()


def test_groups_carry_their_step_and_a_step_click_shows_them():
    dash = RolloutDashboard()
    g = [{"reward": 0.0}, {"reward": 1.0}]
    dash.extend([g, g])  # step 0: the first extend
    dash.extend([[{"reward": 1.0}, {"reward": 1.0}]])  # step 1: the next
    dash.extend([g], step=5)
    dash.add_group({"samples": g, "step": 2})  # its own step key wins
    dash.add_group(g)  # joins the newest group's step
    dash.flush()
    assert [grp.step for grp in dash.groups] == [0, 0, 1, 5, 2, 2]
    assert dash.step_rewards() == {0: 0.5, 1: 1.0, 2: 0.5, 5: 0.5}
    assert list(dash.step_fig.data[0].x) == [0, 1, 2, 5]
    click(dash.step_fig, 0, 3)  # the point of step 5
    assert dash.view.step == 5 and shown_groups(dash) == [3]
    assert "filter: step 5" in dash.filter_label.value
    dash.show_step(0)
    assert shown_groups(dash) == [1, 0]
    assert list(dash.hist_fig.data[0].y) == [2, 2]  # the histogram follows the shown step
    dash.filter_reward(1.0, 1.0, include_hi=True)  # step and reward filters combine
    assert shown_groups(dash) == [1, 0] and "step 0 · reward in [1, 1]" in dash.filter_label.value
    dash.show_step(1)
    assert shown_groups(dash) == [2]
    dash.clear_filter()
    assert shown_groups(dash) == [5, 4, 3, 2, 1, 0]
    dash.close()


def test_sampler_trainer_kl_chart_and_its_warning(ip):
    dash = RolloutDashboard(kl_threshold=1e-2)
    # Step 0: sampler and trainer agree to 1e-3 per token: KL (0.001 + 0.002) / 2.
    dash.extend([[{"reward": 1.0, "logprobs": [-1.0, -2.0], "trainer_logprobs": [-1.001, -2.002]},
                  {"reward": 0.0}]])
    dash.flush()
    assert list(dash.kl_fig.data[0].y) == pytest.approx([0.0015])
    assert dash.kl_banner.value == "" and "wb-kl-warning" not in dash.static_html()
    dash.add_kl(1, 0.05)  # e.g. workbench.rl.sampler_trainer_kl of a stale sampler's batch
    dash.flush()
    assert list(dash.kl_fig.data[0].x) == [0, 1] and list(dash.kl_fig.data[0].y) == pytest.approx([0.0015, 0.05])
    assert 'class="wb-kl-warning"' in dash.kl_banner.value and "step 1 (+0.05)" in dash.kl_banner.value
    assert list(dash.kl_fig.data[0].marker.color) == ["#1f77b4", "#d62728"]
    assert "KL out of range at steps [1]" in repr(dash)
    click(dash.kl_fig, 0, 1)  # a KL point leads to its step too
    assert dash.view.step == 1
    dash.add_kl(1, -0.004)  # back in range (add_kl replaces a step's value)
    dash.flush()
    assert dash.kl_banner.value == ""
    dash.set_kl_threshold(1e-3)  # a stricter range: step 0's 0.0015 is now out
    assert "step 0 (+0.0015)" in dash.kl_banner.value
    assert [s["y0"] for s in dash.kl_fig.layout.shapes] == [1e-3, -1e-3]
    dash.close()
    ip.user_ns["kl_groups"] = [[{"reward": 1.0, "logprobs": [-1.0], "trainer_logprobs": [-1.05]}]]
    dash = ip.run_line_magic("tinker", "rollouts kl_groups --kl-threshold 0.1")
    assert dash.kl_threshold == 0.1 and dash.kl_banner.value == ""  # 0.05 is within 0.1
    dash.close()
    ip.user_ns["bad_kl"] = [[{"reward": 1.0, "logprobs": [-1.0, -2.0], "trainer_logprobs": [-1.0]}]]
    with pytest.raises(UsageError, match="trainer_logprobs has 1 entries but logprobs has 2"):
        ip.run_line_magic("tinker", "rollouts bad_kl")
    with pytest.raises(UsageError, match="kl_threshold must be > 0"):
        ip.run_line_magic("tinker", "rollouts kl_groups --kl-threshold 0")


# ----------------------------------------------------------------------- %tinker plot

LOSSES = [4.0, 2.0, 1.0, 3.0]  # train/loss_per_token of the recipe-style run
REWARDS = [0.0, 1.0, 0.0, 0.5, 1.0]  # env/all/reward/total of the cookbook-style run


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def runs(tmp_path):
    """Two metrics.jsonl: one as workbench.recipes.sft writes it (an eval-only last row at
    step n_steps), one in the tinker-cookbook's layout."""
    write_jsonl(tmp_path / "sft" / "metrics.jsonl",
                [{"step": i, "loss:sum": 10 * v, "train/loss_per_token": v, "optim/lr": 1e-3}
                 for i, v in enumerate(LOSSES)] + [{"step": len(LOSSES), "held_out/nll": 0.7}])
    write_jsonl(tmp_path / "cookbook" / "metrics.jsonl",
                [{"step": i, "env/all/reward/total": r, "train/loss": 1.0 - r / 2, "progress/done_frac": i / 5,
                  "time/total": 0.1 * i} for i, r in enumerate(REWARDS)])
    return tmp_path


def test_plot_overlays_runs_and_the_slider_resmooths(ip, runs):
    sft, cookbook = runs / "sft", runs / "cookbook" / "metrics.jsonl"  # a directory and a file
    plot = ip.run_line_magic("tinker", f"plot {sft} {cookbook} --metric train/loss_per_token "
                                       "--metric env/all/reward/total train/loss --smoothing 0.5")
    assert list(plot.runs) == ["sft", "cookbook"]
    assert plot.metrics == ["train/loss_per_token", "env/all/reward/total", "train/loss"]
    raw, smooth = (plot.fig.data[i] for i in plot.traces[("sft", "train/loss_per_token")])
    assert list(raw.x) == [0, 1, 2, 3] and list(raw.y) == LOSSES and raw.opacity == 0.3  # raw faint
    # The debiased EMA by hand, smoothing 0.5: acc = 0.5 acc + 0.5 v, weight = 0.5 weight + 0.5,
    # line = acc / weight: (2 / 0.5, 2 / 0.75, 1.5 / 0.875, 2.25 / 0.9375).
    assert list(smooth.y) == pytest.approx([4.0, 8 / 3, 12 / 7, 2.4])
    assert plot.smoothed("cookbook", "env/all/reward/total") == pytest.approx(ema(REWARDS, 0.5))
    assert plot.data[("sft", "env/all/reward/total")] == ([], [])  # a run without the metric: no line
    plot.slider.value = 0.9  # the slider redraws every smoothed line; raw stays
    assert plot.smoothing == 0.9
    assert list(smooth.y) == pytest.approx(ema(LOSSES, 0.9))
    assert list(smooth.y)[1] == pytest.approx((0.9 * 0.1 * 4 + 0.1 * 2) / (0.9 * 0.1 + 0.1))
    assert plot.smoothed("cookbook", "train/loss") == pytest.approx(ema([1.0 - r / 2 for r in REWARDS], 0.9))
    assert list(raw.y) == LOSSES
    plot.slider.value = 0.0  # 0: the smoothed line is the raw one
    assert list(smooth.y) == pytest.approx(LOSSES)
    assert "sft" in repr(plot) and "svg" in plot.static_html()
    plot.close()


def test_plot_picks_a_metric_and_names_bad_input(ip, runs):
    plot = ip.run_line_magic("tinker", f"plot {runs / 'sft'} {runs / 'cookbook'}")
    assert plot.metrics == ["env/all/reward/total"] and plot.smoothing == 0.6  # no metric in common: the reward
    plot.close()
    plot = ip.run_line_magic("tinker", f"plot {runs / 'sft'}")  # one run alone: its loss
    assert plot.metrics == ["train/loss_per_token"]
    plot.close()
    with pytest.raises(UsageError, match=r"no metrics file at '.*nowhere'"):
        ip.run_line_magic("tinker", f"plot {runs / 'sft'} {runs / 'nowhere'}")
    with pytest.raises(UsageError, match=r"no run has metric 'reward'; available: env/all/reward/total, "
                                         r"held_out/nll, loss:sum, optim/lr, progress/done_frac"):
        ip.run_line_magic("tinker", f"plot {runs / 'sft'} {runs / 'cookbook'} --metric reward")
    with pytest.raises(UsageError, match="at most 4 runs at a time, got 5"):
        ip.run_line_magic("tinker", "plot " + " ".join([str(runs / "sft")] * 5))
    with pytest.raises(UsageError, match="a run is named twice"):
        ip.run_line_magic("tinker", f"plot {runs / 'sft'} {runs / 'sft'}")
    with pytest.raises(UsageError, match=r"smoothing must be in \[0, 1\)"):
        ip.run_line_magic("tinker", f"plot {runs / 'sft'} --smoothing 1")
    (runs / "broken.jsonl").write_text('{"step": 0, "x": 1}\n{not json\n')
    with pytest.raises(UsageError, match="broken.jsonl line 2 is not JSON"):
        ip.run_line_magic("tinker", f"plot {runs / 'broken.jsonl'}")
    with pytest.raises(UsageError, match="the following arguments are required: paths"):
        ip.run_line_magic("tinker", "plot")


# ----------------------------------------------------------------- loss curve slider

class FakeClient:
    """What LossCurve.attach reads of a TrainingClient: listeners and the run's facts."""

    base_model, lora_rank, trainable_parameters = "tiny-qwen3", 4, 12_345

    def __init__(self):
        self.listeners = []

    def add_listener(self, listener):
        self.listeners.append(listener)

    def remove_listener(self, listener):
        self.listeners.remove(listener)


def test_loss_curve_smoothing_slider_and_run_facts():
    curve = LossCurve(smoothing=0.5)
    client = FakeClient()
    curve.attach(client, name="tc")
    values = [5.0, 3.0, 4.0, 1.0]
    for step, v in enumerate(values):
        client.listeners[0](step, "forward_backward", {"loss:sum": v})
    curve.flush()
    smooth = curve.fig.data[1]
    assert list(smooth.y) == pytest.approx(ema(values, 0.5)) and curve.slider.value == 0.5
    curve.slider.value = 0.8
    assert curve.smoothing == 0.8 and list(smooth.y) == pytest.approx(ema(values, 0.8))
    assert list(curve.fig.data[0].y) == values  # raw unchanged
    curve.set_smoothing(0.0)
    assert curve.slider.value == 0.0 and list(smooth.y) == pytest.approx(values)
    assert curve.widget.children[:2] == (curve.info, curve.slider)  # the facts and slider above the figure
    info = curve.info.value
    assert "<b>tc</b>" in info and "base model tiny-qwen3" in info and "LoRA rank 4" in info
    assert "trainable 12,345 (12.3k)" in info and "server unknown" in info
    with pytest.raises(ValueError, match="smoothing"):
        curve.set_smoothing(1.0)
    curve.close()
    assert not client.listeners and curve.slider.comm is None
