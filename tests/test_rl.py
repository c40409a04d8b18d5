"""workbench.rl: advantages, datums, KL shaping, rollouts (real server, tiny-qwen3)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from workbench import types
from workbench.rl.advantages import (
    add_kl_penalty, compute_advantages, remove_constant_reward_groups, sampler_trainer_kl,
)
from workbench.rl.data_processing import (
    assemble_training_data, loss_datums, loss_fn_config, trajectory_to_datums,
)
from workbench.rl.problem_env import ProblemDataset, ProblemEnv
from workbench.rl.rollouts import do_group_rollouts, rollout_metrics
from workbench.rl.types import (
    Env, EnvGroupBuilder, StepResult, TokensWithLogprobs, Trajectory, TrajectoryGroup, Transition,
)

MI = types.ModelInput.from_ints


def traj(reward: float, ob=(1, 2, 3), ac=(7, 8), lps=(-0.5, -1.5)) -> Trajectory:
    tr = Transition(MI(list(ob)), TokensWithLogprobs(list(ac), list(lps)), reward, True)
    return Trajectory([tr], types.ModelInput.empty())


def group(*rewards: float) -> TrajectoryGroup:
    return TrajectoryGroup([traj(r) for r in rewards], [0.0] * len(rewards))


# ---------------------------------------------------------------- pure data

def test_advantages_are_rewards_minus_group_mean_without_std_division():
    groups = [group(1.0, 0.0, 0.0, 1.0), group(3.0, 1.0), TrajectoryGroup([traj(1.0), traj(0.0)], [2.0, 0.0])]
    advs = compute_advantages(groups)
    assert advs[0] == [0.5, -0.5, -0.5, 0.5]
    assert advs[1] == [1.0, -1.0]  # std division would give the same +-1 only by accident...
    assert compute_advantages([group(10.0, 0.0)])[0] == [5.0, -5.0]  # ...this shows there is none
    assert advs[2] == [1.5, -1.5]  # group rewards add to the step rewards


def test_constant_reward_groups_are_dropped_and_counted():
    groups = [group(1.0, 1.0, 1.0), group(0.0, 1.0), group(0.0, 0.0), group(0.5, 0.25)]
    kept, dropped = remove_constant_reward_groups(groups)
    assert dropped == 2
    assert kept == [groups[1], groups[3]]
    assert remove_constant_reward_groups([group(0.0, 0.0)]) == ([], 1)


def test_datum_is_next_token_aligned_with_zero_advantage_on_prompt_tokens():
    [d] = trajectory_to_datums(traj(1.0, ob=(1, 2, 3), ac=(7, 8), lps=(-0.5, -1.5)), advantage=0.25)
    assert d.model_input.to_ints() == [1, 2, 3, 7]
    inputs = {k: v.tolist() for k, v in d.loss_fn_inputs.items()}
    assert inputs["target_tokens"] == [2, 3, 7, 8]
    assert inputs["logprobs"] == [0.0, 0.0, -0.5, -1.5]
    assert inputs["advantages"] == [0.0, 0.0, 0.25, 0.25]
    assert inputs["mask"] == [0.0, 0.0, 1.0, 1.0]
    assert "mask" not in loss_datums([d])[0].loss_fn_inputs
    assert loss_datums([d])[0].loss_fn_inputs["advantages"].tolist() == inputs["advantages"]


def test_multi_turn_datum_merges_turns_that_extend_the_sequence():
    t1 = Transition(MI([1, 2]), TokensWithLogprobs([5], [-0.1]), 0.0, False)
    t2 = Transition(MI([1, 2, 5, 9]), TokensWithLogprobs([6, 4], [-0.2, -0.3]), 1.0, True)
    t3 = Transition(MI([3]), TokensWithLogprobs([8], [-0.4]), 0.0, True)  # history rewritten
    datums = trajectory_to_datums(Trajectory([t1, t2, t3], types.ModelInput.empty()), 2.0)
    assert len(datums) == 2
    first = datums[0].loss_fn_inputs
    assert datums[0].model_input.to_ints() == [1, 2, 5, 9, 6]
    assert first["target_tokens"].tolist() == [2, 5, 9, 6, 4]
    assert first["mask"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]  # the env's token 9 is prompt
    assert first["advantages"].tolist() == [0.0, 2.0, 0.0, 2.0, 2.0]
    assert first["logprobs"].tolist() == pytest.approx([0.0, -0.1, 0.0, -0.2, -0.3])
    assert datums[1].model_input.to_ints() == [3]


def test_assemble_maps_datums_back_to_groups_and_checks_lengths():
    groups = [group(1.0, 0.0), group(0.0, 1.0, 1.0)]
    data, meta = assemble_training_data(groups, compute_advantages(groups))
    assert len(data) == 5
    assert meta[2] == {"group": 1, "trajectory": 0}
    assert data[2].loss_fn_inputs["advantages"].tolist()[-1] == pytest.approx(-2 / 3)
    with pytest.raises(ValueError, match="2 groups but 1"):
        assemble_training_data(groups, [[0.0, 0.0]])


def test_loss_fn_config_per_loss_and_unknown_loss():
    assert loss_fn_config("importance_sampling") is None
    assert loss_fn_config("ppo", 0.7, 1.3) == {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}
    assert loss_fn_config("dro", dro_beta=0.2) == {"beta": 0.2}
    with pytest.raises(ValueError, match="unknown RL loss 'reinforce'"):
        loss_fn_config("reinforce")


# --------------------------------------------------------------- real server

class CountingSampler:
    """The real SamplingClient, with its sample calls counted (not a mock: calls go through)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def sample(self, prompt, num_samples, sampling_params):
        self.calls.append((prompt.length, num_samples, sampling_params.max_tokens))
        return self.inner.sample(prompt, num_samples, sampling_params)


class EchoEnv(Env):
    """Two turns: the second prompt extends the first with the action and a marker token."""

    def __init__(self, prompt):
        self.prompt = prompt

    def initial_observation(self):
        return MI(self.prompt), []

    def step(self, action):
        if not hasattr(self, "first"):
            self.first = list(action)
            return StepResult(0.5, False, MI(self.prompt + self.first + [11]), [])
        return StepResult(float(len(action)), True, types.ModelInput.empty(), [], {"turn2": 1.0})


class EchoBuilder(EnvGroupBuilder):
    def __init__(self, prompt, n):
        self.prompt, self.n = prompt, n

    def make_envs(self):
        return [EchoEnv(self.prompt) for _ in range(self.n)]

    def logging_tags(self):
        return ["echo"]


@pytest.fixture(scope="module")
def base_sampler(service):
    return service.create_sampling_client(base_model="tiny-qwen3")


def test_rollouts_batch_identical_prompts_and_keep_budget(base_sampler):
    sampler = CountingSampler(base_sampler)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    # A budget of 8 binds on turn 2 (its prompt is 4..8 or 3..7 tokens), so it is exercised.
    groups = do_group_rollouts([EchoBuilder([5, 6, 7], 3), EchoBuilder([9, 10], 2)], sampler, params,
                               max_trajectory_tokens=8)
    # Turn 1: one call per group (num_samples = group size), both submitted before waiting.
    assert sampler.calls[:2] == [(3, 3, 4), (2, 2, 4)]
    # Later turns sample only up to what is left of the budget.
    assert all(max_tokens == min(4, 8 - prompt_len) for prompt_len, _, max_tokens in sampler.calls[2:])
    assert [len(g.trajectories) for g in groups] == [3, 2]
    for g in groups:
        for t in g.trajectories:
            first, *rest = t.transitions
            assert 1 <= len(first.ac.tokens) <= 4 and len(first.ac.logprobs) == len(first.ac.tokens)
            assert all(lp <= 0 for lp in first.ac.logprobs)
            if rest:  # the second prompt is the first + action + marker, within the budget
                assert rest[0].ob.to_ints() == first.ob.to_ints() + first.ac.tokens + [11]
                assert rest[0].ob.length + len(rest[0].ac.tokens) <= 8
            else:
                assert t.end_reason == "budget"
    metrics = rollout_metrics(groups)
    assert metrics["env/trajectories"] == 5.0 and "env/echo/reward_mean" in metrics


def test_rl_datums_reproduce_sampler_logprobs_and_train_under_every_loss(service, base_sampler):
    """A datum's targets line up with what was sampled: forward on unchanged weights gives the
    sampler's logprobs at every action token, so importance ratios start at exactly 1."""
    training = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=0)
    sampler = training.save_weights_and_get_sampling_client("rl-test")
    builders = [EchoBuilder([5, 6, 7], 2)]
    # Seeded: an unseeded request draws a random seed on the server, so a failure (say, one
    # rare token's logprob off by more than atol) could not be reproduced.
    groups = do_group_rollouts(builders, sampler, types.SamplingParams(max_tokens=3, seed=0))
    groups[0].group_rewards[:] = [1.0, 0.0]  # make the group non-constant whatever was sampled
    data, _ = assemble_training_data(groups, compute_advantages(groups))
    out = training.forward(loss_datums(data), "importance_sampling").result(60)
    total_adv = 0.0
    for d, o in zip(data, out.loss_fn_outputs):
        mask = d.loss_fn_inputs["mask"].to_numpy() > 0
        np.testing.assert_allclose(o["logprobs"].to_numpy()[mask], d.loss_fn_inputs["logprobs"].to_numpy()[mask],
                                   atol=1e-4)
        total_adv += float(d.loss_fn_inputs["advantages"].to_numpy().sum())
    assert abs(sampler_trainer_kl(data, out)) < 1e-4  # same weights: KL is numerics only
    # ratio 1 everywhere: importance_sampling's loss is -sum(A)
    assert out.metrics["loss:sum"] == pytest.approx(-total_adv, abs=1e-3)
    for loss in ("ppo", "cispo", "dro"):
        out = training.forward(loss_datums(data), loss, loss_fn_config(loss)).result(60)
        assert np.isfinite(out.metrics["loss:sum"])


def test_sampler_trainer_kl_is_the_mean_logprob_gap_over_action_tokens():
    """Two datums (a prompt of 3 tokens then 2 actions; 1 then 1): only action tokens count."""
    t1 = Trajectory([Transition(MI([1, 2, 3]), TokensWithLogprobs([4, 5], [-1.0, -2.0]), 1.0, True)],
                    types.ModelInput.empty())
    t2 = Trajectory([Transition(MI([1]), TokensWithLogprobs([6], [-0.5]), 0.0, True)], types.ModelInput.empty())
    data = trajectory_to_datums(t1, 0.5) + trajectory_to_datums(t2, -0.5)
    # Trainer logprobs per target token; prompt positions get values that must not count.
    trainer = [[-9.0, -9.0, -1.25, -1.5], [-0.25]]
    fb = types.ForwardBackwardOutput(
        loss_fn_output_type="importance_sampling", metrics={},
        loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(np.array(t, dtype=np.float32))}
                         for t in trainer])
    # Action tokens: (-1 - -1.25) + (-2 - -1.5) + (-0.5 - -0.25) = 0.25 - 0.5 - 0.25, over 3 tokens.
    assert sampler_trainer_kl(data, fb) == pytest.approx(-0.5 / 3)
    with pytest.raises(ValueError, match="pass the datums before loss_datums"):
        sampler_trainer_kl(loss_datums(data), fb)
    with pytest.raises(ValueError, match="2 datums but 1 loss_fn_outputs"):
        sampler_trainer_kl(data, fb.model_copy(update={"loss_fn_outputs": fb.loss_fn_outputs[:1]}))
    with pytest.raises(ValueError, match=r"data\[1\]: 1 target tokens but the trainer returned 4"):
        sampler_trainer_kl(data, fb.model_copy(update={"loss_fn_outputs": fb.loss_fn_outputs[:1] * 2}))


def test_kl_penalty_shapes_action_advantages_by_the_logprob_gap(base_sampler):
    prompt, action = [5, 6, 7, 8], [20, 21, 22]
    fake_q = [-1.0, -2.0, -3.0]  # pretend sampler logprobs
    t = Trajectory([Transition(MI(prompt), TokensWithLogprobs(action, fake_q), 1.0, True)],
                   types.ModelInput.empty())
    [d] = trajectory_to_datums(t, advantage=0.5)
    [shaped], metrics = add_kl_penalty([d], base_sampler, kl_coef=0.1)
    base_lp = base_sampler.compute_logprobs(MI(prompt + action)).result(60)[1:]
    adv = shaped.loss_fn_inputs["advantages"].tolist()
    n_prompt = len(prompt) - 1
    assert adv[:n_prompt] == [0.0] * n_prompt  # prompt tokens untouched
    expected = [0.5 - 0.1 * (q - b) for q, b in zip(fake_q, base_lp[n_prompt:])]
    assert adv[n_prompt:] == pytest.approx(expected, abs=1e-5)
    gap = np.mean([q - b for q, b in zip(fake_q, base_lp[n_prompt:])])
    assert metrics["kl/sampler_reference"] == pytest.approx(gap, abs=1e-5)
    assert d.loss_fn_inputs["advantages"].tolist()[-1] == 0.5  # the input datum is unchanged


def test_problem_env_rewards_checked_answers_and_dataset_is_deterministic(base_sampler):
    from workbench import renderers, tasks

    renderer = renderers.get_renderer("qwen3", base_sampler.get_tokenizer())
    train, _ = tasks.get_task("arithmetic").split(6, 0, seed=0)
    problem = train[0]
    env = ProblemEnv(problem, renderer)
    ob, stop = env.initial_observation()
    assert ob.to_ints() == renderer.build_generation_prompt(problem.prompt_messages()).to_ints()
    assert stop == list(renderer.get_stop_sequences())
    tok = renderer.tokenizer
    right = tok.encode(f"<think>\n\n</think>\n\n{problem.answer}<|im_end|>")
    wrong = tok.encode(f"{int(problem.answer) + 1}<|im_end|>")
    unended = tok.encode(problem.answer)  # truncated: never ended its turn
    assert env.step(right).reward == 1.0
    assert ProblemEnv(problem, renderer).step(wrong).reward == 0.0
    assert ProblemEnv(problem, renderer).step(unended).metrics == {"correct": 0.0, "parse_ok": 0.0}
    dataset = ProblemDataset(train, renderer, groups_per_batch=3, group_size=2, n_batches=4, seed=1)
    batch = dataset.get_batch(2)
    assert [b.problem for b in batch] == [b.problem for b in dataset.get_batch(2)]
    assert len(batch) == 3 and len(batch[0].make_envs()) == 2
    assert pickle.loads(pickle.dumps(batch[0])).problem == batch[0].problem  # picklable builder
    with pytest.raises(ValueError, match="groups_per_batch must be in"):
        ProblemDataset(train, renderer, groups_per_batch=7, group_size=2)
