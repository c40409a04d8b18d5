"""Advantages: reward minus the group mean, constant groups dropped, and per-token KL shaping.

No division by the group's standard deviation (as in the cookbook): it would blow up groups
that are nearly constant, and the reward scale is the task's business.
"""

from __future__ import annotations

from typing import Sequence

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
