"""RL building blocks: Env / EnvGroupBuilder / RLDataset (types), rollouts through a
SamplingClient, group-centred advantages, trajectories -> Datums, and ProblemEnv for the
synthetic tasks. The GRPO-style loop that composes them is `workbench.recipes.rl`."""

from .advantages import (
    add_kl_penalty, compute_advantages, remove_constant_reward_groups, sampler_trainer_kl,
)
from .data_processing import assemble_training_data, loss_datums, loss_fn_config, trajectory_to_datums
from .problem_env import ProblemDataset, ProblemEnv, ProblemGroupBuilder
from .rollouts import do_group_rollout, do_group_rollouts, rollout_metrics
from .types import (
    Env, EnvGroupBuilder, RLDataset, StepResult, TokensWithLogprobs, Trajectory, TrajectoryGroup,
    Transition,
)

__all__ = [
    "Env", "EnvGroupBuilder", "ProblemDataset", "ProblemEnv", "ProblemGroupBuilder", "RLDataset",
    "StepResult", "TokensWithLogprobs", "Trajectory", "TrajectoryGroup", "Transition",
    "add_kl_penalty", "assemble_training_data", "compute_advantages", "do_group_rollout",
    "do_group_rollouts", "loss_datums", "loss_fn_config", "remove_constant_reward_groups",
    "rollout_metrics", "sampler_trainer_kl", "trajectory_to_datums",
]
