"""Rollouts: run groups of envs to the end through a SamplingClient.

Every turn, the sample calls of all still-running envs of all groups are submitted before any
is waited on, so the server decodes them together in one cycle. Envs that ask for the same
prompt with the same stop condition (the usual GRPO group: one problem, G attempts) share one
`sample(num_samples=k)` call.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..types import ModelInput, SamplingParams
from .types import (
    Env, EnvGroupBuilder, StopCondition, TokensWithLogprobs, Trajectory, TrajectoryGroup,
    Transition,
)


@dataclass
class _Episode:
    env: Env
    ob: ModelInput
    stop: StopCondition
    transitions: list[Transition] = field(default_factory=list)
    done: bool = False
    end_reason: str = "done"


def do_group_rollouts(
    builders: Sequence[EnvGroupBuilder],
    sampling_client,
    sampling_params: SamplingParams,
    max_trajectory_tokens: Optional[int] = None,
) -> list[TrajectoryGroup]:
    """Run every group's envs to the end; one TrajectoryGroup per builder, in order.

    `sampling_params` gives max_tokens per turn, temperature and so on; its `stop` is replaced
    by each env's stop condition. `max_trajectory_tokens` is the token budget of a whole
    episode (prompt plus every turn): a turn may sample only up to what is left, and an
    episode with no room left ends with `end_reason="budget"`.
    """
    if max_trajectory_tokens is not None and max_trajectory_tokens < 2:
        raise ValueError(f"max_trajectory_tokens must be >= 2, got {max_trajectory_tokens}")
    env_groups = [list(b.make_envs()) for b in builders]
    for i, envs in enumerate(env_groups):
        if not envs:
            raise ValueError(f"builders[{i}].make_envs() returned no envs")
    episodes = [[_start(env) for env in envs] for envs in env_groups]
    flat = [ep for group in episodes for ep in group]
    turn = 0
    while any(not ep.done for ep in flat):
        _run_turn([ep for ep in flat if not ep.done], sampling_client, sampling_params,
                  max_trajectory_tokens, turn)
        turn += 1
    groups = []
    for builder, group in zip(builders, episodes):
        trajectories = [Trajectory(ep.transitions, ep.ob, ep.end_reason) for ep in group]
        extra = [float(r) for r in builder.compute_group_rewards(trajectories)]
        groups.append(TrajectoryGroup(trajectories, extra, list(builder.logging_tags())))
    return groups


def do_group_rollout(builder: EnvGroupBuilder, sampling_client, sampling_params: SamplingParams,
                     max_trajectory_tokens: Optional[int] = None) -> TrajectoryGroup:
    """One group's rollout (see do_group_rollouts, which batches many groups)."""
    return do_group_rollouts([builder], sampling_client, sampling_params, max_trajectory_tokens)[0]


def _start(env: Env) -> _Episode:
    ob, stop = env.initial_observation()
    if not isinstance(ob, ModelInput):
        raise TypeError(f"{type(env).__name__}.initial_observation() must return (ModelInput, stop), "
                        f"got {type(ob).__name__} first")
    return _Episode(env, ob, list(stop or []))


def _run_turn(active: list[_Episode], sampling_client, params: SamplingParams,
              budget: Optional[int], turn: int) -> None:
    """Sample one action for every active episode (all calls submitted first), then step."""
    by_request: dict[tuple, list[_Episode]] = defaultdict(list)
    for ep in active:
        max_tokens = params.max_tokens
        if budget is not None:
            room = budget - ep.ob.length
            if room < 1:
                ep.done, ep.end_reason = True, "budget"
                continue
            max_tokens = room if max_tokens is None else min(max_tokens, room)
        by_request[(tuple(ep.ob.to_ints()), tuple(ep.stop), max_tokens)].append(ep)

    futures = []
    for k, ((prompt, stop, max_tokens), eps) in enumerate(by_request.items()):
        update = {"stop": list(stop) or None, "max_tokens": max_tokens}
        if params.seed is not None:  # one seed for every call would repeat the same samples
            update["seed"] = params.seed + 100_003 * turn + k
        futures.append(sampling_client.sample(
            ModelInput.from_ints(prompt), num_samples=len(eps),
            sampling_params=params.model_copy(update=update),
        ))
    for future, eps in zip(futures, by_request.values()):
        for ep, seq in zip(eps, future.result().sequences):
            _step(ep, TokensWithLogprobs(list(seq.tokens), list(seq.logprobs or [])))


def _step(ep: _Episode, action: TokensWithLogprobs) -> None:
    result = ep.env.step(action.tokens)
    ep.transitions.append(Transition(ep.ob, action, float(result.reward), result.episode_done,
                                     dict(result.metrics)))
    ep.ob = result.next_observation
    ep.stop = list(result.next_stop_condition or [])
    ep.done = result.episode_done


def rollout_metrics(groups: Sequence[TrajectoryGroup]) -> dict[str, float]:
    """Per-batch figures: reward mean/min/max, tokens sampled, turns, env metrics, per tag."""
    rewards = [r for g in groups for r in g.total_rewards()]
    trajectories = [t for g in groups for t in g.trajectories]
    if not rewards:
        return {}
    metrics = {
        "env/reward_mean": sum(rewards) / len(rewards),
        "env/reward_min": min(rewards),
        "env/reward_max": max(rewards),
        "env/trajectories": float(len(rewards)),
        "env/ac_tokens_mean": sum(len(tr.ac.tokens) for t in trajectories for tr in t.transitions)
        / len(trajectories),
        "env/turns_mean": sum(len(t.transitions) for t in trajectories) / len(trajectories),
        "env/budget_ended_frac": sum(t.end_reason == "budget" for t in trajectories) / len(trajectories),
    }
    sums: dict[str, list[float]] = defaultdict(list)
    for t in trajectories:
        for tr in t.transitions:
            for name, value in tr.metrics.items():
                sums[f"env/{name}"].append(float(value))
    metrics.update({name: sum(v) / len(v) for name, v in sums.items()})
    by_tag: dict[str, list[float]] = defaultdict(list)
    for g in groups:
        for tag in g.tags:
            by_tag[tag].extend(g.total_rewards())
    metrics.update({f"env/{tag}/reward_mean": sum(v) / len(v) for tag, v in by_tag.items()})
    return metrics
