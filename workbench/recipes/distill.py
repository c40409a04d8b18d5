"""Distillation from a teacher sampler into a LoRA student, on- or off-policy.

    python -m workbench.recipes.distill --teacher-path wb://<run>/sampler_weights/final
    python -m workbench.recipes.distill --mode off_policy --teacher-path ...

on_policy: the student samples answers to the task's prompts; the teacher scores them with
compute_logprobs; each sampled token's advantage is the negative per-token reverse KL,
-(log p_student - log p_teacher), trained with importance_sampling. The logged
`kl/sampler_reference` is the sampled estimate of KL(student || teacher) on that batch.

off_policy: the teacher answers every training prompt once (all calls submitted, then
awaited) and the student is fine-tuned on those conversations (the SFT recipe's loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from ..data import SupervisedDataset, conversation_to_datum
from ..rl.advantages import add_kl_penalty, sampler_trainer_kl
from ..rl.data_processing import assemble_training_data, loss_datums
from ..rl.problem_env import ProblemDataset
from ..rl.rollouts import do_group_rollouts, rollout_metrics
from ..types import AdamParams, SamplingParams
from . import common, sft


@dataclass(frozen=True)
class Config(common.BaseConfig):
    log_dir: str = "runs/distill"  # metrics.jsonl, config.json and checkpoints.jsonl go here
    learning_rate: float = 1e-3  # Adam learning rate
    mode: Literal["on_policy", "off_policy"] = "on_policy"  # student samples, or teacher samples
    teacher_path: Optional[str] = None  # teacher's sampler weights (wb://.../sampler_weights/...); None: base model
    n_steps: int = 20  # optimizer steps
    groups_per_batch: int = 8  # prompts per step
    group_size: int = 4  # student samples per prompt (on_policy)
    max_tokens: int = 16  # sampling budget per answer
    kl_coef: float = 1.0  # scale of the reverse-KL advantage (on_policy)
    keep_unended: bool = False  # off_policy: also train on teacher answers cut by max_tokens


def main(config: Config) -> common.RecipeResult:
    service = common.make_service(config)
    training, start = common.make_training_client(service, config)
    renderer = common.make_renderer(training, config)
    if config.teacher_path:
        teacher = service.create_sampling_client(model_path=config.teacher_path)
    else:
        teacher = service.create_sampling_client(base_model=training.base_model)
    train, _ = common.task_split(config)
    log = common.MetricsLog(config.log_dir, config)
    common.print_banner(training, config, f"workbench distill ({config.mode})", start,
                        batch=f"{config.groups_per_batch} prompts x {config.group_size} samples"
                        if config.mode == "on_policy" else f"{config.groups_per_batch} prompts",
                        teacher=config.teacher_path or "the base model")
    if config.mode == "off_policy":
        off_policy(training, teacher, renderer, train, config, log, start)
    else:
        on_policy(training, teacher, renderer, train, config, log, start)
    return common.finish(training, config, log, config.n_steps - 1)


def on_policy(training, teacher, renderer, problems, config: Config, log, start: int) -> None:
    dataset = ProblemDataset(problems, renderer, config.groups_per_batch, config.group_size,
                             n_batches=config.n_steps, seed=config.seed, tag=config.task)
    params = SamplingParams(max_tokens=config.max_tokens, temperature=1.0)
    adam = AdamParams(learning_rate=config.learning_rate)
    bar = common.progress(range(start, config.n_steps), config.n_steps - start, "distill", config.progress)
    for step in bar:
        student = training.save_weights_and_get_sampling_client(f"distill-{step:06d}")
        groups = do_group_rollouts(dataset.get_batch(step), student,
                                   common.step_sampling_params(params, config, step))
        metrics = rollout_metrics(groups)  # the task reward too: a distillation side view
        # The task reward plays no part: advantages are the KL shaping alone.
        data, _ = assemble_training_data(groups, [[0.0] * len(g.trajectories) for g in groups])
        data, kl_metrics = add_kl_penalty(data, teacher, config.kl_coef)
        metrics.update(kl_metrics)
        step_metrics, fb_output = common.train_step_output(training, loss_datums(data),
                                                           "importance_sampling", adam)
        metrics.update(step_metrics)
        metrics["train/kl_sampler_trainer"] = sampler_trainer_kl(data, fb_output)
        common.show(bar, log.log(step, metrics))
        common.maybe_save(training, config, step)


def teacher_conversations(teacher, renderer, problems, max_tokens: int,
                          keep_unended: bool = False) -> list[list[dict]]:
    """Each problem's prompt plus the teacher's greedy answer. Answers cut by max_tokens are
    dropped unless `keep_unended`: the rendered conversation closes the turn the teacher
    never closed, so they teach the student to stop where the teacher did not."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences())
    futures = [teacher.sample(renderer.build_generation_prompt(p.prompt_messages()), 1, params)
               for p in problems]
    out = []
    for problem, future in zip(problems, futures):
        message, ended = renderer.parse_response(future.result().sequences[0].tokens)
        if ended or keep_unended:
            out.append(problem.prompt_messages() + [{"role": "assistant", "content": message["content"]}])
    return out


def off_policy(training, teacher, renderer, problems, config: Config, log, start: int) -> None:
    conversations = teacher_conversations(teacher, renderer, problems, config.max_tokens,
                                          config.keep_unended)
    if len(conversations) < config.groups_per_batch:
        raise ValueError(f"the teacher ended only {len(conversations)} of {len(problems)} answers "
                         f"within max_tokens={config.max_tokens}; fewer than groups_per_batch")
    data = [conversation_to_datum(c, renderer) for c in conversations]
    dataset = SupervisedDataset(data, config.groups_per_batch, seed=config.seed)
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(common.BaseConfig)}
    sft_config = sft.Config(**{**shared, "n_steps": config.n_steps,
                               "batch_size": config.groups_per_batch, "eval_every": 0})
    sft.run_sft_steps(training, dataset, sft_config, log, evaluators=[], start=start)


if __name__ == "__main__":
    common.cli(Config, main)
