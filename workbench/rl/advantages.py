"""Advantages: reward minus the group mean, constant groups dropped, per-token KL shaping, and
the sampler-vs-trainer KL check.

No division by the group's standard deviation (as in the cookbook): it would blow up groups
that are nearly constant, and the reward scale is the task's business.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..data import target_logprobs
from ..types import Datum
from .types import TrajectoryGroup


def compute_advantages(groups: Sequence[TrajectoryGroup]) -> list[list[float]]:
    """Per group, each trajectory's total reward minus the group's mean total reward."""
    out = []
    for group in groups:
        rewards = group.total_rewards()
        mean = sum(rewards) / len(rewards)
        out.append([r - mean for r in rewards])
    return out


def remove_constant_reward_groups(
    groups: Sequence[TrajectoryGroup],
) -> tuple[list[TrajectoryGroup], int]:
    """(groups whose rewards differ, how many were dropped).

    A group whose trajectories all got the same reward has advantage 0 everywhere: it carries
    no gradient signal, only cost. The count goes into the step's metrics so a batch that is
    all-constant (too hard or too easy) shows up instead of silently training on nothing.
    """
    kept = [g for g in groups if len(set(g.total_rewards())) > 1]
    return kept, len(groups) - len(kept)


def add_kl_penalty(
    data: Sequence[Datum], reference_client, kl_coef: float
) -> tuple[list[Datum], dict[str, float]]:
    """Shape advantages by -kl_coef * (logp_sampler - logp_reference) on every action token.

    `reference_client` is a SamplingClient on the reference weights (the base model for a KL
    penalty, the teacher for on-policy distillation). Each datum needs target_tokens, logprobs
    (the sampler's), advantages and mask (1 on action tokens). All compute_logprobs calls are
    submitted before any is waited on. Returns new datums (the inputs are left as they were)
    and `kl/sampler_reference`: the mean of logp_sampler - logp_reference over action tokens,
    a sample estimate of KL(sampler || reference).
    """
    import numpy as np

    data = list(data)
    references = target_logprobs(reference_client, data)
    shaped, diff_sum, n_tokens = [], 0.0, 0.0
    for datum, reference in zip(data, references):
        inputs = datum.loss_fn_inputs
        mask_T = inputs["mask"].to_numpy()
        ref_T = np.asarray(reference, dtype=np.float64)
        assert ref_T.shape == mask_T.shape, (ref_T.shape, mask_T.shape)
        diff_T = (inputs["logprobs"].to_numpy() - ref_T) * mask_T
        diff_sum += float(diff_T.sum())
        n_tokens += float(mask_T.sum())
        new_inputs = dict(inputs)
        new_inputs["advantages"] = inputs["advantages"].to_numpy() - kl_coef * diff_T
        shaped.append(Datum(model_input=datum.model_input, loss_fn_inputs=new_inputs))
    return shaped, {"kl/sampler_reference": diff_sum / max(n_tokens, 1.0)}


def sampler_trainer_kl(data: Sequence[Datum], fb_output: Any) -> float:
    """Mean over action tokens of logp_sampler - logp_trainer: a sample estimate of
    KL(sampler || trainer) for the batch a forward_backward just trained on.

    `data`: the datums as assembled (assemble_training_data: with `logprobs`, the sampler's,
    and `mask`, 1 on action tokens), in the order sent; `fb_output`: that forward_backward's
    result, whose loss_fn_outputs carry the trainer's `logprobs` of the same target tokens.
    On-policy the two models are the same weights, so it stays near 0 (numerics only); a
    stale sampler or a sampler/trainer mismatch shows up here first. NaN for no action token.
    """
    outputs = fb_output.loss_fn_outputs
    if len(outputs) != len(data):
        raise ValueError(f"{len(data)} datums but {len(outputs)} loss_fn_outputs")
    diff_sum, n_tokens = 0.0, 0.0
    for i, (datum, out) in enumerate(zip(data, outputs)):
        inputs = datum.loss_fn_inputs
        if "mask" not in inputs or "logprobs" not in inputs:
            raise ValueError(f"data[{i}] needs loss_fn_inputs 'logprobs' and 'mask' (pass the datums "
                             "before loss_datums removes the mask)")
        mask_T = inputs["mask"].to_numpy()
        sampler_T = inputs["logprobs"].to_numpy()
        trainer_T = out["logprobs"].to_numpy()
        if trainer_T.shape != mask_T.shape:
            raise ValueError(f"data[{i}]: {mask_T.shape[0]} target tokens but the trainer returned "
                             f"{trainer_T.shape[0]} logprobs")
        diff_sum += float(((sampler_T - trainer_T) * mask_T).sum())
        n_tokens += float(mask_T.sum())
    return diff_sum / n_tokens if n_tokens else float("nan")
