"""Supervised fine-tuning: cross_entropy on the assistant turns of conversations.

    python -m workbench.recipes.sft --task recall --n-steps 60 --log-dir runs/sft
    python -m workbench.recipes.sft --data-path chats.jsonl --log-dir runs/sft

Conversations come from a JSONL file (`{"messages": [...]}` per line) or from a synthetic
task's training split; held-out task problems give an exact-match eval, held-out
conversations an NLL eval, every `eval_every` steps and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .. import hyperparams
from ..data import SupervisedDataset, conversation_to_datum, load_conversations_jsonl
from ..eval import ExactMatchEvaluator, NLLEvaluator, PeriodicEvaluator
from ..types import AdamParams, Datum
from . import common

SCHEDULES = {"constant": hyperparams.constant, "linear": hyperparams.linear_decay,
             "cosine": hyperparams.cosine_with_warmup}


@dataclass(frozen=True)
class Config(common.BaseConfig):
    log_dir: str = "runs/sft"  # metrics.jsonl, config.json and checkpoints.jsonl go here
    learning_rate: float = 3e-3  # peak Adam learning rate
    data_path: Optional[str] = None  # JSONL conversations; None: the task's training split
    batch_size: int = 16  # conversations per step
    n_steps: int = 60  # optimizer steps
    max_length: int = 512  # conversations are cut to this many tokens
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # multiplier over steps
    warmup_steps: int = 0  # linear warmup steps of the schedule
    eval_every: int = 20  # evaluate every N steps and at the end (0: only at the end)
    eval_max_tokens: int = 16  # sampling budget of the exact-match eval


def main(config: Config) -> common.RecipeResult:
    if config.eval_every < 0:  # checked before any server work
        raise ValueError(f"eval_every must be >= 0 (0: evaluate only at the end), got {config.eval_every}")
    service = common.make_service(config)
    training, start = common.make_training_client(service, config)
    renderer = common.make_renderer(training, config)
    train_datums, evaluators = _data_and_evals(config, renderer, training.get_tokenizer())
    dataset = SupervisedDataset(train_datums, config.batch_size, seed=config.seed)
    log = common.MetricsLog(config.log_dir, config)
    common.print_banner(training, config, "workbench sft", start, batch_size=config.batch_size)
    run_sft_steps(training, dataset, config, log, evaluators, start)
    return common.finish(training, config, log, config.n_steps - 1)


def run_sft_steps(training, dataset: SupervisedDataset, config: Config, log: common.MetricsLog,
                  evaluators: list, start: int = 0) -> None:
    """Steps start..n_steps-1 over `dataset` (reshuffled every epoch), with periodic evals.

    Evaluations run before the update of steps 0, eval_every, 2 * eval_every, ... and once
    more after the last step (a row at step n_steps). Shared with the off-policy distillation
    recipe, which trains on teacher samples.
    """
    schedule = SCHEDULES[config.lr_schedule]
    # eval_every 0: a period no step of the loop reaches and no step-0 run, so only the final
    # evaluation below runs (max(..., 1): PeriodicEvaluator rejects a period of 0 steps).
    periodic = PeriodicEvaluator(evaluators, config.eval_every or max(config.n_steps, 1),
                                 run_at_start=config.eval_every > 0)
    bar = common.progress(range(start, config.n_steps), config.n_steps - start, "sft", config.progress)
    for step in bar:
        # Evaluated before the step's update: step 0's row holds the untrained model's figures.
        evals = (periodic.maybe_run(step, training) or {}) if evaluators else {}
        dataset.set_epoch(step // len(dataset))
        batch = dataset.get_batch(step % len(dataset))
        multiplier = schedule(step, total_steps=config.n_steps, warmup_steps=config.warmup_steps)
        adam = AdamParams(learning_rate=config.learning_rate * multiplier)
        metrics = common.train_step(training, batch, "cross_entropy", adam)
        n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
        metrics.update({"train/loss_per_token": metrics["loss:sum"] / max(n_tokens, 1.0),
                        "train/trained_tokens": n_tokens, "optim/lr": adam.learning_rate})
        common.show(bar, log.log(step, {**evals, **metrics}))
        common.maybe_save(training, config, step)
    if evaluators:  # the final evaluation: a row of its own, at step n_steps
        log.log(config.n_steps, periodic.maybe_run(config.n_steps, training, force=True))


def _data_and_evals(config: Config, renderer, tokenizer) -> tuple[list[Datum], list]:
    """Training datums, and the evaluators of the held-out part (exact match needs a task)."""
    def to_datums(conversations):
        return [conversation_to_datum(c, renderer, max_length=config.max_length) for c in conversations]

    if config.data_path:
        conversations = load_conversations_jsonl(config.data_path)
        n_test = min(config.n_test, len(conversations) // 5)  # hold out at most a fifth
        train, held_out = conversations[n_test:], conversations[:n_test]
        evaluators = [NLLEvaluator(to_datums(held_out), "held_out", tokenizer)] if held_out else []
        return to_datums(train), evaluators
    train, test = common.task_split(config)
    evaluators = [
        NLLEvaluator(to_datums(p.conversation() for p in test), "held_out", tokenizer),
        ExactMatchEvaluator(test, renderer, name=config.task, max_tokens=config.eval_max_tokens),
    ] if test else []
    return to_datums(p.conversation() for p in train), evaluators


if __name__ == "__main__":
    common.cli(Config, main)
