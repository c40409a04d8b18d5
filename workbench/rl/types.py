"""The RL extension points: Env, EnvGroupBuilder, RLDataset, and the data that flows out.

An `Env` is one episode for one agent (single use: make it, run it to the end, drop it). An
`EnvGroupBuilder` makes the group of envs whose rewards are centred together (GRPO: the same
problem several times). An `RLDataset` hands out batches of builders. The rollout loop
(`workbench.rl.rollouts`) turns a batch into `TrajectoryGroup`s; `workbench.rl.data_processing` turns
those into training `Datum`s.

Envs are synchronous on purpose: the sampling happens on the server and the rollout loop
batches every env's sample call before it waits, so an env's own work is only parsing and
scoring text. That keeps envs plain classes that run the same in scripts and notebooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence, Union

from ..types import ModelInput

Action = list[int]  # the sampled token ids of one turn
Metrics = dict[str, float]
# What ends a turn's sampling: stop strings or stop token ids (SamplingParams.stop). An empty
# list keeps the model's own end-of-sequence stop.
StopCondition = Union[list[str], list[int]]


@dataclass
class StepResult:
    reward: float  # immediate reward for this action
    episode_done: bool
    next_observation: ModelInput  # the next prompt (ModelInput.empty() when done)
    next_stop_condition: StopCondition
    metrics: Metrics = field(default_factory=dict)


class Env(ABC):
    """One episode. Single use: `initial_observation()` once, then `step()` until done."""

    @abstractmethod
    def initial_observation(self) -> tuple[ModelInput, StopCondition]:
        """The first prompt and what stops its sampling."""

    @abstractmethod
    def step(self, action: Action) -> StepResult:
        """Score one sampled turn and say what comes next."""


class EnvGroupBuilder(ABC):
    """Makes one group of envs; rewards are centred within the group.

    Must be picklable (rollouts may run in other processes): hold configuration (strings,
    numbers, a problem), and build tokenizers, renderers and envs inside `make_envs`.
    """

    @abstractmethod
    def make_envs(self) -> Sequence[Env]:
        """Fresh envs for one group."""

    def compute_group_rewards(self, trajectories: Sequence["Trajectory"]) -> list[float]:
        """Extra reward per trajectory that needs the whole group (pairwise judges); 0 by default."""
        return [0.0] * len(trajectories)

    def logging_tags(self) -> list[str]:
        """Names under which this group's metrics are also reported (e.g. the task name)."""
        return []


class RLDataset(ABC):
    """Batches of env group builders: `get_batch(i)` for i in range(len(dataset))."""

    @abstractmethod
    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        """The builders of batch `index`."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of batches."""


@dataclass
class TokensWithLogprobs:
    tokens: list[int]
    logprobs: list[float]  # the sampler's logprob of each token (the policy q of the losses)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.logprobs):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.logprobs)} logprobs")


@dataclass
class Transition:
    ob: ModelInput  # the prompt the action was sampled from
    ac: TokensWithLogprobs
    reward: float
    episode_done: bool
    metrics: Metrics = field(default_factory=dict)


@dataclass
class Trajectory:
    transitions: list[Transition]
    final_ob: ModelInput
    # Why the episode ended: "done" (the env said so) or "budget" (token budget exhausted).
    end_reason: str = "done"

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.transitions)


@dataclass
class TrajectoryGroup:
    trajectories: list[Trajectory]
    group_rewards: list[float]  # from EnvGroupBuilder.compute_group_rewards
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.trajectories) != len(self.group_rewards):
            raise ValueError(
                f"{len(self.trajectories)} trajectories but {len(self.group_rewards)} group rewards"
            )

    def total_rewards(self) -> list[float]:
        """Per trajectory: the sum of its step rewards plus its group reward."""
        return [t.total_reward + g for t, g in zip(self.trajectories, self.group_rewards)]
