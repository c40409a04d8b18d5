"""GRPO-style RL on a verifiable synthetic task.

    python -m workbench.recipes.rl --task recall --load-checkpoint-path wb://.../weights/final

Every step: snapshot the weights into a fresh sampling client, roll out `group_size` attempts
at each of `groups_per_batch` problems, centre rewards within each group (constant groups
dropped and counted), optionally shape advantages with a KL penalty against the base model,
then one forward_backward (importance_sampling by default; any policy loss of the registry,
workbench.losses.POLICY_LOSSES, selectable) and optim_step submitted back to back.

`async_off_by_one`: the rollouts of batch i+1 start (on a worker thread, with the sampler of
the weights before step i) while step i trains, so sampling overlaps training. The data is
then one update stale; the policy losses correct for it through the sampler's logprobs (the
importance ratio). Default off: strictly on-policy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ..losses import PolicyLossType
from ..rl.advantages import (
    add_kl_penalty, compute_advantages, remove_constant_reward_groups, sampler_trainer_kl,
)
from ..rl.data_processing import assemble_training_data, loss_datums, loss_fn_config
from ..rl.problem_env import ProblemDataset
from ..rl.rollouts import do_group_rollouts, rollout_metrics
from ..rl.types import RLDataset
from ..types import AdamParams, SamplingParams
from . import common


@dataclass(frozen=True)
class Config(common.BaseConfig):
    log_dir: str = "runs/rl"  # metrics.jsonl, config.json and checkpoints.jsonl go here
    learning_rate: float = 1e-3  # Adam learning rate
    n_steps: int = 20  # RL steps (one batch of rollouts each)
    groups_per_batch: int = 8  # problems per batch
    group_size: int = 8  # attempts per problem (rewards centred within them)
    max_tokens: int = 16  # sampling budget per attempt
    temperature: float = 1.0  # sampling temperature
    top_k: int = -1  # sample among the k likeliest tokens only (-1: all)
    loss_fn: PolicyLossType = "importance_sampling"  # policy loss (workbench.losses.POLICY_LOSSES)
    clip_low: float = 0.8  # ppo/cispo ratio clip, low end
    clip_high: float = 1.2  # ppo/cispo ratio clip, high end
    dro_beta: float = 0.05  # dro's quadratic penalty
    kl_coef: float = 0.0  # KL penalty against the base model (0: off)
    async_off_by_one: bool = False  # sample batch i+1 while training on batch i


def main(config: Config, dataset: Optional[RLDataset] = None) -> common.RecipeResult:
    """Run the loop. `dataset` (at least n_steps batches) replaces the default: ProblemEnvs
    on the training split of config.task, groups_per_batch x group_size per batch."""
    service = common.make_service(config)
    training, start = common.make_training_client(service, config)
    if dataset is None:
        train, _ = common.task_split(config)
        dataset = ProblemDataset(train, common.make_renderer(training, config), config.groups_per_batch,
                                 config.group_size, n_batches=config.n_steps, seed=config.seed,
                                 tag=config.task)
    if len(dataset) < config.n_steps:
        raise ValueError(f"the dataset has {len(dataset)} batches, fewer than n_steps={config.n_steps}")
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                            top_k=config.top_k)
    base = service.create_sampling_client(base_model=training.base_model) if config.kl_coef else None
    log = common.MetricsLog(config.log_dir, config)
    common.print_banner(training, config, "workbench rl", start, loss_fn=config.loss_fn,
                        batch=f"{config.groups_per_batch} groups x {config.group_size} samples")

    def rollout(step: int, sampler):
        return do_group_rollouts(dataset.get_batch(step), sampler,
                                 common.step_sampling_params(params, config, step))

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None  # the next batch's rollouts, when sampling runs ahead (off by one)
        bar = common.progress(range(start, config.n_steps), config.n_steps - start, "rl", config.progress)
        for step in bar:
            # A fresh snapshot every step: sampling from a stale client is a classic RL bug.
            sampler = training.save_weights_and_get_sampling_client(f"rl-{step:06d}")
            groups = pending.result() if pending is not None else rollout(step, sampler)
            pending = None
            if config.async_off_by_one and step + 1 < config.n_steps:
                pending = pool.submit(rollout, step + 1, sampler)
            metrics = train_on_groups(training, groups, config, base)
            common.show(bar, log.log(step, metrics))
            common.maybe_save(training, config, step)
    return common.finish(training, config, log, config.n_steps - 1)


def train_on_groups(training, groups, config: Config, base_sampler=None) -> dict:
    """Advantages, datums, optional KL shaping, and one training step; the step's metrics."""
    metrics = rollout_metrics(groups)
    kept, dropped = remove_constant_reward_groups(groups)
    metrics["train/constant_groups_dropped"] = dropped
    data, _ = assemble_training_data(kept, compute_advantages(kept))
    if base_sampler is not None and data:
        data, kl_metrics = add_kl_penalty(data, base_sampler, config.kl_coef)
        metrics.update(kl_metrics)
    metrics["train/datums"] = len(data)
    if not data:  # every group constant: nothing to learn from this batch
        return metrics
    adam = AdamParams(learning_rate=config.learning_rate)
    cfg = loss_fn_config(config.loss_fn, config.clip_low, config.clip_high, config.dro_beta)
    step_metrics, fb_output = common.train_step_output(training, loss_datums(data), config.loss_fn, adam, cfg)
    metrics.update(step_metrics)
    # ~0 on-policy (numerics only); one update stale with async_off_by_one.
    metrics["train/kl_sampler_trainer"] = sampler_trainer_kl(data, fb_output)
    return metrics


if __name__ == "__main__":
    common.cli(Config, main)
