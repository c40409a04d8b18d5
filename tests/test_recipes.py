"""The recipes run end to end through main(config) on a real server and demonstrably learn.

Smoke sizes on tiny-qwen3 (CPU); every figure asserted is measured from the run's own
metrics.jsonl rows.
"""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------- SFT

@pytest.fixture(scope="module")
def sft_run(server, tmp_path_factory):
    """A short SFT run on the recall task; also the teacher of the distillation test."""
    config = sft.Config(**run_kwargs(server, tmp_path_factory.mktemp("sft"), "sft"), n_steps=8,
                        batch_size=8, n_train=16, n_test=4, eval_every=0, learning_rate=3e-3)
    return config, sft.main(config)


def test_sft_loss_falls_logs_jsonl_and_resumes(sft_run):
    config, result = sft_run
    rows = [json.loads(line) for line in open(f"{config.log_dir}/metrics.jsonl")]
    train_rows = [r for r in rows if "train/loss_per_token" in r]
    assert [r["step"] for r in train_rows] == list(range(8))
    first, last = train_rows[0]["train/loss_per_token"], train_rows[-1]["train/loss_per_token"]
    assert last < 0.6 * first, (first, last)  # measured: about 8.3 -> 2.1 nats per token
    final_eval = rows[-1]  # the final held-out evaluation, a row at step n_steps
    assert final_eval["step"] == 8 and final_eval["eval/held_out/nll"] < 0.6 * first
    assert result.state_path.startswith("wb://") and "/weights/final" in result.state_path
    assert "/sampler_weights/final" in result.sampler_path

    resumed = sft.main(sft.Config(**{**config.__dict__, "n_steps": 10}))
    assert [r["step"] for r in resumed.metrics if "train/loss_per_token" in r] == [8, 9]
    assert resumed.metrics[0]["train/loss_per_token"] < 0.6 * first  # it kept its weights


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


@pytest.mark.parametrize("loss_fn,off_by_one,lr", [("importance_sampling", False, 1e-2), ("ppo", True, 5e-3)])
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


# ---------------------------------------------------------------------------- DPO

def test_dpo_margin_and_held_out_preference_rise(server, tmp_path):
    config = dpo.Config(**run_kwargs(server, tmp_path, "dpo"), n_steps=8, pairs_per_batch=8, n_train=16,
                        n_test=8, learning_rate=5e-3, beta=0.5, eval_every=0)
    rows = dpo.main(config).metrics
    train_rows = [r for r in rows if "dpo/margin" in r]
    assert train_rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference
    assert mean(train_rows[-2:], "dpo/margin") > 0.5, [r["dpo/margin"] for r in train_rows]
    assert mean(train_rows[-2:], "dpo/accuracy") >= 0.75
    final = rows[-1]  # held-out pairs: figures logged (no gain asserted at this smoke size)
    assert final["step"] == 8 and 0.0 <= final["eval/pref_accuracy"] <= 1.0


# ------------------------------------------------------------------------ distill

def test_on_policy_distillation_lowers_reverse_kl(server, tmp_path, sft_run):
    """Student: the SFT run's weights; teacher: the base model (teacher_path None). The
    student samples its own answers and is pulled back toward the teacher token by token."""
    _, student_start = sft_run
    config = distill.Config(**run_kwargs(server, tmp_path, "distill"), load_checkpoint_path=student_start.state_path,
                            n_steps=4, groups_per_batch=4, group_size=4, max_tokens=8, n_train=16,
                            learning_rate=1e-2)
    rows = distill.main(config).metrics
    kls = [r["kl/sampler_reference"] for r in rows]
    print("distill reverse KL per step", [round(k, 3) for k in kls])
    assert mean(rows[-2:], "kl/sampler_reference") < 0.7 * mean(rows[:2], "kl/sampler_reference"), kls


def test_off_policy_distillation_fits_teacher_answers(server, tmp_path, sft_run):
    _, teacher = sft_run
    config = distill.Config(**run_kwargs(server, tmp_path, "distill_off"), mode="off_policy",
                            teacher_path=teacher.sampler_path, n_steps=4, groups_per_batch=4, n_train=16,
                            max_tokens=12, learning_rate=3e-3, keep_unended=True)
    rows = distill.main(config).metrics
    assert rows[-1]["train/loss_per_token"] < 0.7 * rows[0]["train/loss_per_token"], rows
