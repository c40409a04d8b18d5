"""The recipes run end to end through main(config) on a real server and demonstrably learn.

Smoke sizes on tiny-qwen3 (CPU); every figure asserted is measured from the run's own
metrics.jsonl rows.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from workbench import types
from workbench.recipes import common, distill, dpo, rl, sft
from workbench.rl.types import Env, EnvGroupBuilder, RLDataset, StepResult

RECIPES = ("sft", "rl", "dpo", "distill")


def mean(rows, key):
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values)


def run_kwargs(server, tmp_path, name):
    return dict(base_url=server.url, api_key=server.api_key, log_dir=str(tmp_path / name), progress=False)


def warm_started_rows(recipe, server, tmp_path, name, state_path, **overrides):
    """The metrics rows of `recipe` on TASK, starting from the state at `state_path`."""
    config = recipe.Config(**run_kwargs(server, tmp_path, name), **TASK,
                           load_checkpoint_path=state_path, **overrides)
    return recipe.main(config).metrics


def sft_state_after(sft_run, steps: int) -> str:
    """The state the SFT run saved after `steps` optimizer steps (it saves every 10)."""
    config, _ = sft_run
    with open(f"{config.log_dir}/checkpoints.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return next(r["state_path"] for r in rows if r["name"] == f"step-{steps - 1:06d}")


# --------------------------------------------------------------------------- CLI

def test_help_of_every_recipe_module():
    procs = {name: subprocess.Popen([sys.executable, "-m", f"workbench.recipes.{name}", "--help"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in RECIPES}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err)
        assert "--learning-rate" in out and "--log-dir" in out and "--config" in out, name
        assert "Adam learning rate" in out  # the field's comment is its help
    assert "--loss-fn {importance_sampling,ppo,cispo,dro}" in subprocess.run(
        [sys.executable, "-m", "workbench.recipes.rl", "--help"], capture_output=True, text=True).stdout


def test_config_from_flags_and_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"n_steps": 7, "loss_fn": "ppo", "kl_coef": 0.5}))
    config = common.parse_config(rl.Config, ["--config", str(path), "--n-steps", "9",
                                             "--async-off-by-one", "true", "--base-url", "none"])
    assert (config.n_steps, config.loss_fn, config.kl_coef) == (9, "ppo", 0.5)
    assert config.async_off_by_one is True and config.base_url is None
    path.write_text(json.dumps({"n_step": 7}))
    with pytest.raises(SystemExit):
        common.parse_config(rl.Config, ["--config", str(path)])
    with pytest.raises(SystemExit):
        common.parse_config(rl.Config, ["--loss-fn", "reinforce"])


def test_task_args_build_the_task_and_bad_ones_are_named():
    task = common.make_task(sft.Config(task="recall", task_args='{"n_keys": 4}'))
    assert len(task.table) == 4
    assert common.make_task(sft.Config(task="arithmetic")).max_operand == 20  # "" keeps the defaults
    with pytest.raises(ValueError, match="task_args must be a JSON object"):
        common.make_task(sft.Config(task_args="n_keys=4"))
    with pytest.raises(ValueError, match="task_args must be a JSON object"):
        common.make_task(sft.Config(task_args="[4]"))
    with pytest.raises(ValueError, match="do not fit task 'recall'.*max_operand"):
        common.make_task(sft.Config(task="recall", task_args='{"max_operand": 4}'))


def test_run_info_docstring_examples_hold():
    import doctest

    from workbench import run_info

    assert doctest.testmod(run_info).failed == 0


def test_a_recipe_prints_its_start_banner_and_a_progress_bar(server, tmp_path, capsys):
    """progress on: one short block of the run's facts on stdout, then a tqdm bar (stderr)
    whose postfix carries the step's loss. Two steps of a tiny SFT run keep it cheap."""
    config = sft.Config(**{**run_kwargs(server, tmp_path, "banner"), "progress": True}, task="recall",
                        task_args='{"n_keys": 4}', n_train=4, n_test=0, n_steps=2, batch_size=2, lora_rank=4)
    rows = sft.main(config).metrics
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("── workbench sft ──")
    assert lines[1:8] == ["base model  tiny-qwen3", "LoRA rank   4", lines[3], f"server      {server.url}",
                          "batch size  2", "steps       2", f"log dir     {config.log_dir}"]
    assert re.fullmatch(r"trainable   [\d,]+ \([\d.]+k\)", lines[3]), lines[3]
    assert "sft: 100%" in err and f"loss={rows[-1]['train/loss_per_token']:.4g}" in err


# ---------------------------------------------------------------------------- SFT

# The acceptance task: key -> value recall with 4 keys x 6 question templates (24 questions).
# A held-out question asks a key through a template the training split paired only with other
# keys, so it is answered by having learnt the table, not the question.
TASK = dict(task="recall", task_args='{"n_keys": 4}', n_train=16, n_test=8)


@pytest.fixture(scope="module")
def sft_run(server, tmp_path_factory):
    """The SFT acceptance run (about 10 s on an idle 2-core CPU); its final weights are also
    the RL warm start and the distillation tests' student/teacher."""
    config = sft.Config(**run_kwargs(server, tmp_path_factory.mktemp("sft"), "sft"), **TASK, n_steps=40,
                        batch_size=8, eval_every=10, learning_rate=3e-3, lora_rank=32, save_every=10)
    return config, sft.main(config)


def test_sft_lifts_held_out_exact_match_to_0_9(sft_run):
    config, result = sft_run
    rows = [json.loads(line) for line in open(f"{config.log_dir}/metrics.jsonl")]
    em = {r["step"]: r["eval/recall/exact_match"] for r in rows if "eval/recall/exact_match" in r}
    print("sft held-out exact match by step", em)
    # Measured (seed 0): 0.0 at steps 0 and 10, 0.75 at 20, 1.0 at 30 and 40. Over seeds 0-7
    # (8 held-out questions) step 30 gave 1.0 for only half of them (.625 the others), step 40
    # gave 1.0 for 7 and 0.875 for one: hence 40 steps, so seed 0 sits well past the point
    # where it reaches 1.0 (held-out NLL 0.135 at step 30, 0.054 at 40).
    assert sorted(em) == [0, 10, 20, 30, 40]
    assert em[0] == 0.0 and em[40] >= 0.9, em
    train_rows = [r for r in rows if "train/loss_per_token" in r]
    assert [r["step"] for r in train_rows] == list(range(40))
    first, last = train_rows[0]["train/loss_per_token"], train_rows[-1]["train/loss_per_token"]
    assert last < 0.1 * first, (first, last)  # measured: about 8.3 -> 0.1 nats per token
    # Measured held-out NLL at step 40, seeds 0-7: 0.04-0.19 (from ~8.3), far inside 0.1x.
    assert rows[-1]["eval/held_out/nll"] < 0.1 * first
    assert result.state_path.startswith("wb://") and "/weights/final" in result.state_path
    assert "/sampler_weights/final" in result.sampler_path


def test_sft_resumes_from_its_last_checkpoint(sft_run):
    config, _ = sft_run
    resumed = sft.main(sft.Config(**{**config.__dict__, "n_steps": 42, "eval_every": 0}))
    assert [r["step"] for r in resumed.metrics if "train/loss_per_token" in r] == [40, 41]
    assert resumed.metrics[0]["train/loss_per_token"] < 0.5  # it kept its weights (fresh: ~8.3)


# ----------------------------------------------------------------------------- RL

class ParityEnv(Env):
    """A verifiable toy the untrained tiny model can improve on at once: one sampled token,
    reward 1 when its id is even. Sampled with top_k=8, so the policy has to move its mass
    among a handful of candidates (about half of them even) and starts well below 1."""

    def initial_observation(self):
        return types.ModelInput.from_ints([5, 6, 7, 8]), []

    def step(self, action):
        return StepResult(float(action[0] % 2 == 0), True, types.ModelInput.empty(), [])


@dataclass(frozen=True)
class ParityBuilder(EnvGroupBuilder):
    size: int

    def make_envs(self):
        return [ParityEnv() for _ in range(self.size)]


class ParityDataset(RLDataset):
    def __init__(self, n_batches, groups, size):
        self.n_batches, self.groups, self.size = n_batches, groups, size

    def get_batch(self, index):
        return [ParityBuilder(self.size) for _ in range(self.groups)]

    def __len__(self):
        return self.n_batches


def test_rl_lifts_mean_reward_on_recall_from_sft_warm_start(server, tmp_path, sft_run):
    """GRPO-style RL (importance_sampling) on the recall task, sampled at temperature 1 from
    the SFT run's weights: greedy answers are right, but sampled ones only ~30% of the time."""
    # From the step-30 state: greedy answers already right, sampled ones far from always.
    rows = warm_started_rows(rl, server, tmp_path, "rl_recall", sft_state_after(sft_run, 30), n_steps=20, groups_per_batch=8,
                             group_size=8, max_tokens=10, learning_rate=3e-4)
    rewards = [r["env/reward_mean"] for r in rows]
    print("rl recall reward per step", [round(x, 3) for x in rewards])
    # One step's 64 samples are noisy: over seeds 0-7, step 0 alone ranged 0.219-0.453, and the
    # former "12 steps, last 4 > step 0 + 0.15, step 0 < 0.45" failed for 4 of those 8 seeds.
    # So the start is the mean of 2 steps, the run is 20 steps, and the bounds have room.
    # Measured (seeds 0-7; seed 0 is the run here): first 2 steps' mean 0.281-0.445 (seed 0:
    # 0.320), last 4 steps' mean 0.488-0.598 (seed 0: 0.531), gain 0.10-0.28 (seed 0: 0.21).
    start, end = mean(rows[:2], "env/reward_mean"), mean(rows[-4:], "env/reward_mean")
    assert 0.1 < start < 0.5, rewards
    assert end > start + 0.05, rewards


@pytest.mark.parametrize("loss_fn,off_by_one,lr", [("ppo", True, 5e-3)])
def test_rl_mean_reward_rises(server, tmp_path, loss_fn, off_by_one, lr):
    config = rl.Config(**run_kwargs(server, tmp_path, "rl"), n_steps=10, max_tokens=1, learning_rate=lr,
                       loss_fn=loss_fn, async_off_by_one=off_by_one, lora_rank=8, kl_coef=0.01, top_k=8)
    result = rl.main(config, dataset=ParityDataset(10, groups=4, size=16))
    rows = result.metrics
    start, end = mean(rows[:2], "env/reward_mean"), mean(rows[-2:], "env/reward_mean")
    print("rl reward per step", loss_fn, [round(r["env/reward_mean"], 3) for r in rows])
    assert start < 0.6, start  # the untrained model's share of even tokens in its top 8
    assert end > start + 0.25 and end > 0.6, (start, end)
    assert all("train/constant_groups_dropped" in r for r in rows)
    # The KL penalty's figure is there whenever something was trained on.
    assert all("kl/sampler_reference" in r for r in rows if r["train/datums"])
    # Sampler vs trainer: step 0 samples from the weights it trains (KL is numerics only);
    # off by one, later steps train on samples one update stale, which the KL shows.
    kls = [r["train/kl_sampler_trainer"] for r in rows if r["train/datums"]]
    print("sampler-trainer KL per step", [f"{k:.2g}" for k in kls])
    assert rows[0]["train/datums"] and abs(rows[0]["train/kl_sampler_trainer"]) < 1e-4
    assert max(abs(k) for k in kls[1:]) > 1e-3


# ---------------------------------------------------------------------------- DPO

def test_dpo_raises_held_out_preference_accuracy(server, tmp_path):
    """Pairs (right value, another key's value) of the recall task; the held-out pairs ask
    keys through templates the training pairs did not pair them with."""
    config = dpo.Config(**run_kwargs(server, tmp_path, "dpo"), **TASK, n_steps=32, pairs_per_batch=8,
                        learning_rate=5e-3, beta=0.5, eval_every=16)
    rows = dpo.main(config).metrics
    train_rows = [r for r in rows if "dpo/margin" in r]
    assert train_rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference
    evals = [r for r in rows if "eval/pref_accuracy" in r]
    print("dpo held-out", [(r["step"], r["eval/pref_accuracy"], r["eval/implicit_accuracy"],
                            round(r["eval/implicit_margin"], 2)) for r in evals])
    assert [r["step"] for r in evals] == [0, 16, 32]
    start, end = evals[0], evals[-1]
    # Measured (seed 0): raw accuracy 0.125 -> 1.0 (step 16) -> 0.875; implicit accuracy 0 ->
    # 1.0 -> 0.875, implicit margin 0 -> 9.8 -> 15.0. Over seeds 0-7 the raw accuracy (the
    # base model's coin-flip prior on 8 pairs plus what DPO moved) ends anywhere in 0.375-1.0,
    # so it is printed, not asserted (">= 0.875 at step 16" held for 2 of 8 seeds). What DPO
    # moves, the implicit reward (policy vs reference), ends at accuracy 0.625-1.0 and margin
    # 1.5-15.0 on all 8 seeds at step 32 (at step 16: accuracy 0.5-1.0, margin 0.25-10.9).
    assert start["eval/implicit_accuracy"] == 0.0 and start["eval/implicit_margin"] == pytest.approx(0.0, abs=1e-3)
    assert end["eval/implicit_accuracy"] >= 0.5 and end["eval/implicit_margin"] > 0.5, evals


def test_eval_every_zero_evaluates_only_at_the_end(server, tmp_path):
    """eval_every 0 is "end only" (its help): one evaluation row at step n_steps, none at step
    0; eval_every 1 evaluates before every step as well. DPO and SFT alike."""
    small = dict(run_kwargs(server, tmp_path, "x"), **TASK, n_steps=2)

    def eval_steps(recipe, key, name, **overrides):
        config = recipe.Config(**{**small, "log_dir": str(tmp_path / name)}, **overrides)
        return [r["step"] for r in recipe.main(config).metrics if key in r]

    assert eval_steps(dpo, "eval/pref_accuracy", "dpo0", pairs_per_batch=2, eval_every=0) == [2]
    assert eval_steps(dpo, "eval/pref_accuracy", "dpo1", pairs_per_batch=2, eval_every=1) == [0, 1, 2]
    assert eval_steps(sft, "eval/held_out/nll", "sft0", batch_size=2, eval_every=0, eval_max_tokens=2) == [2]
    for recipe in (dpo, sft):
        with pytest.raises(ValueError, match="eval_every must be >= 0.*got -1"):
            recipe.main(recipe.Config(**small, eval_every=-1))


# ------------------------------------------------------------------------ distill

def test_on_policy_distillation_lowers_reverse_kl(server, tmp_path, sft_run):
    """Student: the SFT run's weights; teacher: the base model (teacher_path None). The
    student samples its own answers and is pulled back toward the teacher token by token."""
    rows = warm_started_rows(distill, server, tmp_path, "distill", sft_run[1].state_path, n_steps=6, groups_per_batch=4,
                             group_size=4, max_tokens=8, learning_rate=1e-3)
    kls = [r["kl/sampler_reference"] for r in rows]
    print("distill reverse KL per step", [round(k, 3) for k in kls])
    assert mean(rows[-2:], "kl/sampler_reference") < 0.7 * mean(rows[:2], "kl/sampler_reference"), kls


def test_off_policy_distillation_fits_teacher_answers(server, tmp_path, sft_run):
    _, teacher = sft_run
    config = distill.Config(**run_kwargs(server, tmp_path, "distill_off"), **TASK, mode="off_policy",
                            teacher_path=teacher.sampler_path, n_steps=6, groups_per_batch=4,
                            max_tokens=12, learning_rate=5e-3, keep_unended=True)
    rows = distill.main(config).metrics
    losses = [r["train/loss_per_token"] for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
