"""Trajectories -> training Datums for the policy losses (workbench.losses.POLICY_LOSSES:
importance_sampling, ppo, cispo, dro).

Every policy-gradient loss reads the same inputs (reference/tinker-api.md; the registry
checks it): target_tokens, logprobs (the sampler's, q) and advantages, next-token aligned
with the model input. Prompt
(observation) positions get advantage 0, so they contribute nothing; action positions get
the trajectory's advantage. A `mask` (1 on action tokens) rides along for client-side
bookkeeping (KL shaping, metrics) and is removed by `loss_datums` before sending.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..losses import POLICY_LOSSES, loss_spec
from ..types import Datum, ModelInput
from .types import Trajectory, TrajectoryGroup

# POLICY_LOSSES (from the registry) stays importable from here.


def trajectory_to_datums(trajectory: Trajectory, advantage: float) -> list[Datum]:
    """One datum per run of turns whose observations extend the sequence so far.

    In a multi-turn episode where each observation is the previous observation + action +
    new tokens, the whole episode is one datum (only the new tokens count as prompt). When an
    observation does not extend the sequence (the env rewrote history), a new datum starts.
    """
    datums: list[Datum] = []
    seq: list[int] = []
    logprobs: list[float] = []
    advantages: list[float] = []
    mask: list[float] = []
    for tr in trajectory.transitions:
        ob = tr.ob.to_ints()
        if seq and ob[: len(seq)] == seq:
            new_ob = ob[len(seq):]
        else:
            if seq:
                datums.extend(_datum(seq, logprobs, advantages, mask))
                seq, logprobs, advantages, mask = [], [], [], []
            new_ob = ob
        n_ac = len(tr.ac.tokens)
        seq += new_ob + tr.ac.tokens
        logprobs += [0.0] * len(new_ob) + list(tr.ac.logprobs)
        advantages += [0.0] * len(new_ob) + [float(advantage)] * n_ac
        mask += [0.0] * len(new_ob) + [1.0] * n_ac
    if seq:
        datums.extend(_datum(seq, logprobs, advantages, mask))
    return datums


def _datum(seq, logprobs, advantages, mask) -> list[Datum]:
    """Next-token alignment: input = seq[:-1]; targets and per-token inputs = [1:]."""
    if len(seq) < 2 or not any(mask[1:]):
        return []  # nothing to predict, or no action token among the targets
    n = len(seq) - 1
    assert len(logprobs) == len(advantages) == len(mask) == n + 1
    return [Datum(
        model_input=ModelInput.from_ints(seq[:-1]),
        loss_fn_inputs={
            "target_tokens": seq[1:],
            "logprobs": logprobs[1:],
            "advantages": advantages[1:],
            "mask": mask[1:],
        },
    )]


def assemble_training_data(
    groups: Sequence[TrajectoryGroup], advantages: Sequence[Sequence[float]]
) -> tuple[list[Datum], list[dict[str, int]]]:
    """Datums of every trajectory, and for each datum its {group, trajectory} indices."""
    if len(groups) != len(advantages):
        raise ValueError(f"{len(groups)} groups but {len(advantages)} advantage lists")
    data, meta = [], []
    for g_i, (group, advs_G) in enumerate(zip(groups, advantages)):
        if len(group.trajectories) != len(advs_G):
            raise ValueError(f"group {g_i}: {len(group.trajectories)} trajectories, {len(advs_G)} advantages")
        for t_i, (traj, adv) in enumerate(zip(group.trajectories, advs_G)):
            new = trajectory_to_datums(traj, adv)
            data.extend(new)
            meta.extend({"group": g_i, "trajectory": t_i} for _ in new)
    return data, meta


def loss_datums(data: Sequence[Datum]) -> list[Datum]:
    """The datums as the loss expects them: client-side fields (mask) removed."""
    return [
        Datum(model_input=d.model_input,
              loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k != "mask"})
        for d in data
    ]


def loss_fn_config(loss_fn: str, clip_low: float = 0.8, clip_high: float = 1.2,
                   dro_beta: float = 0.05) -> Optional[dict]:
    """The loss_fn_config of a policy loss: the registry's config keys of `loss_fn`, each
    given the value below (None for a loss without config keys, importance_sampling)."""
    if loss_fn not in POLICY_LOSSES:
        raise ValueError(f"unknown RL loss {loss_fn!r}; choose one of {', '.join(POLICY_LOSSES)}")
    values = {"clip_low_threshold": clip_low, "clip_high_threshold": clip_high, "beta": dro_beta}
    keys = loss_spec(loss_fn).config_keys
    missing = [k for k in keys if k not in values]
    if missing:  # a new policy loss's config key: give it a parameter above
        raise ValueError(f"loss_fn_config has no value for {loss_fn}'s config keys {missing}")
    return {k: values[k] for k in keys} or None
