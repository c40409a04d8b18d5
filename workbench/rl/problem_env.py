"""An env for verifiable single-turn problems (workbench.tasks): reward 1 if the checker
accepts the parsed answer, else 0.

    renderer = renderers.get_renderer("qwen3", tokenizer)
    train, _ = tasks.get_task("recall").split(64, 16)
    dataset = ProblemDataset(train, renderer, groups_per_batch=8, group_size=8)
    groups = do_group_rollouts(dataset.get_batch(0), sampling_client, SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from ..types import ModelInput
from .types import Action, Env, EnvGroupBuilder, RLDataset, StepResult, StopCondition


class ProblemEnv(Env):
    """One attempt at one problem: the prompt is the problem's messages rendered for
    generation; the episode ends after one turn.

    `problem` needs `prompt_messages()` and `check(text) -> bool` (workbench.tasks.Problem).
    A response that did not end its turn (truncated by max_tokens) earns 0 even if its text
    would pass, so the policy is also taught to stop.
    """

    def __init__(self, problem: Any, renderer: Any):
        self.problem = problem
        self.renderer = renderer

    def initial_observation(self) -> tuple[ModelInput, StopCondition]:
        prompt = self.renderer.build_generation_prompt(self.problem.prompt_messages())
        return prompt, list(self.renderer.get_stop_sequences())

    def step(self, action: Action) -> StepResult:
        message, ended = self.renderer.parse_response(list(action))
        correct = bool(ended and self.problem.check(message["content"]))
        return StepResult(
            reward=float(correct),
            episode_done=True,
            next_observation=ModelInput.empty(),
            next_stop_condition=[],
            metrics={"correct": float(correct), "parse_ok": float(ended)},
        )


@dataclass(frozen=True)
class ProblemGroupBuilder(EnvGroupBuilder):
    """`group_size` attempts at the same problem (their rewards are centred together).

    Picklable when the renderer is (the built-in renderers hold a Hugging Face tokenizer,
    which pickles).
    """

    problem: Any
    renderer: Any
    group_size: int
    tag: str = "problems"

    def make_envs(self) -> Sequence[Env]:
        return [ProblemEnv(self.problem, self.renderer) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return [self.tag]


class ProblemDataset(RLDataset):
    """`n_batches` batches of `groups_per_batch` problems each, drawn without replacement
    within a batch; batch i depends only on (seed, i), so a resumed run sees the same data."""

    def __init__(self, problems: Sequence[Any], renderer: Any, groups_per_batch: int,
                 group_size: int, n_batches: int = 1000, seed: int = 0, tag: str = "problems"):
        if not problems:
            raise ValueError("ProblemDataset needs at least one problem")
        if not 1 <= groups_per_batch <= len(problems):
            raise ValueError(f"groups_per_batch must be in [1, {len(problems)}] (the number of "
                             f"problems), got {groups_per_batch}")
        if group_size < 1 or n_batches < 1:
            raise ValueError(f"group_size and n_batches must be >= 1, got {group_size}, {n_batches}")
        self.problems = list(problems)
        self.renderer = renderer
        self.groups_per_batch, self.group_size = groups_per_batch, group_size
        self.n_batches, self.seed, self.tag = n_batches, seed, tag

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch index {index} out of range (0..{self.n_batches - 1})")
        picked = random.Random(f"{self.seed}:{index}").sample(self.problems, self.groups_per_batch)
        return [ProblemGroupBuilder(p, self.renderer, self.group_size, self.tag) for p in picked]

    def __len__(self) -> int:
        return self.n_batches
