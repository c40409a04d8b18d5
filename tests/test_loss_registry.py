"""Every loss is one registry entry (workbench.losses.LOSS_SPECS) plus its formula
(server/engine/losses.py): these tests tie everything else that names losses to the registry,
so adding a loss elsewhere fails here instead of drifting."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.engine import losses as engine_losses
from workbench import losses as registry
from workbench import types
from workbench.recipes import common
from workbench.recipes import rl as rl_recipe
from workbench.rl import data_processing

ROOT = Path(__file__).resolve().parents[1]
SPECS = registry.LOSS_SPECS
NAMES = [spec.name for spec in SPECS]


# ------------------------------------------------------------------ one list of names

def test_registry_names_equal_engine_formulas_and_loss_fn_type():
    assert list(registry.LOSS_NAMES) == NAMES
    assert list(engine_losses.LOSSES) == NAMES  # same names, in the registry's order
    assert list(typing.get_args(registry.LossFnType)) == NAMES
    assert types.LossFnType is registry.LossFnType  # the API type is the registry's


def test_derived_tables_come_from_the_registry():
    assert types.LOSS_INPUTS is registry.LOSS_INPUTS
    assert types.LOSS_CONFIG_KEYS is registry.LOSS_CONFIG_KEYS
    assert types.loss_request_problem is registry.loss_request_problem
    for spec in SPECS:
        assert registry.loss_spec(spec.name) is spec
        assert registry.LOSS_INPUTS[spec.name] == spec.inputs
        assert registry.LOSS_CONFIG_KEYS[spec.name] == spec.config_keys
        assert registry.LOSS_REQUIRED_CONFIG[spec.name] == spec.required_config
        assert spec.formula, f"{spec.name} has no one-line formula"
        # every per-token input a loss reads gets its fixed dtype on the client
        assert all(types._LOSS_INPUT_DTYPES[name] == "float32" for name in spec.inputs)


def test_policy_losses_and_the_rl_recipe_choices_come_from_the_registry():
    policy = [spec.name for spec in SPECS if spec.policy]
    assert list(registry.POLICY_LOSSES) == policy
    assert data_processing.POLICY_LOSSES is registry.POLICY_LOSSES
    assert list(typing.get_args(registry.PolicyLossType)) == policy
    hint = typing.get_type_hints(rl_recipe.Config)["loss_fn"]
    assert list(typing.get_args(hint)) == policy
    assert common._converter(hint)[1] == policy  # the CLI's --loss-fn choices
    assert rl_recipe.Config().loss_fn in policy


def test_every_policy_loss_reads_sampler_logprobs_and_advantages():
    for spec in SPECS:
        if spec.policy:
            assert {"logprobs", "advantages"} <= set(spec.inputs), spec.name
    with pytest.raises(ValueError, match="must read logprobs and advantages"):
        registry.LossSpec("reinforce", ("advantages",), policy=True)
    with pytest.raises(ValueError, match="not among its config_keys"):
        registry.LossSpec("x", ("weights",), ("a",), required_config=("b",))
    with pytest.raises(ValueError, match="needs a default or must be required"):
        registry.LossSpec("x", ("weights",), ("a",))
    assert registry.full_config("ppo", {"clip_low_threshold": 0.5}) == {
        "clip_low_threshold": 0.5, "clip_high_threshold": 1.2}


# ------------------------------------------------------ what each formula really reads

class Recording(dict):
    """A dict that notes every key read (`read`)."""

    def __init__(self, data):
        super().__init__(data)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


# A value for every config key any loss has: its default, or 0.1 for a required key.
CONFIG_VALUES = {key: spec.defaults.get(key, 0.1) for spec in SPECS for key in spec.config_keys}


def _inputs(n=5):
    rng = np.random.default_rng(0)
    names = {name for spec in SPECS for name in spec.inputs} | {"target_tokens", "mask"}
    return {name: torch.tensor(rng.normal(size=n), dtype=torch.float32) for name in sorted(names)}


@pytest.mark.parametrize("spec", SPECS, ids=NAMES)
def test_formula_reads_exactly_the_registry_inputs_and_only_its_config_keys(spec):
    formula = engine_losses.LOSSES[spec.name]
    lp = torch.linspace(-3, -0.1, 5, requires_grad=True)
    inputs = Recording(_inputs())
    config = Recording(CONFIG_VALUES)  # every key any loss knows: the formula picks its own
    loss = formula(lp, inputs, config)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert lp.grad is not None
    # The engine hands a formula exactly LOSS_INPUTS[name]: it must read all and no others.
    assert inputs.read == set(spec.inputs), spec.name
    assert config.read <= set(spec.config_keys), f"{spec.name} reads config {config.read - set(spec.config_keys)}"
    # Only the required keys given: the registry's defaults fill in the others.
    only_required = {k: CONFIG_VALUES[k] for k in spec.required_config}
    assert torch.isfinite(formula(lp.detach(), _inputs(), registry.full_config(spec.name, only_required)))


def test_engine_refuses_to_import_when_a_registry_loss_has_no_formula():
    code = ("import workbench.losses as W\n"
            "W.LOSS_NAMES = (*W.LOSS_NAMES, 'new_loss')\n"
            "import server.engine.losses\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and "new_loss" in out.stderr, out.stderr


# ------------------------------------------------------------- the request check

def _data(spec, n=3):
    arrays = {"target_tokens": np.arange(n), **{name: np.zeros(n, np.float32) for name in spec.inputs}}
    return [(n, arrays)]


@pytest.mark.parametrize("spec", SPECS, ids=NAMES)
def test_request_check_follows_the_registry(spec):
    required = {k: CONFIG_VALUES[k] for k in spec.required_config}
    assert registry.loss_request_problem(spec.name, required, _data(spec)) is None
    every = {k: CONFIG_VALUES[k] for k in spec.config_keys}
    assert registry.loss_request_problem(spec.name, every, _data(spec)) is None
    for key in spec.required_config:
        problem = registry.loss_request_problem(spec.name, {k: v for k, v in required.items() if k != key},
                                                _data(spec))
        assert problem == (f"the {spec.name} loss needs loss_fn_config[{key!r}]", "loss_fn_config")
    problem = registry.loss_request_problem(spec.name, {**required, "no_such_key": 1.0}, _data(spec))
    assert problem is not None and problem[1] == "loss_fn_config" and "no_such_key" in problem[0]
    for name in spec.inputs:
        (n, arrays), = _data(spec)
        del arrays[name]
        assert registry.loss_request_problem(spec.name, required, [(n, arrays)]) == (
            f"{spec.name} needs loss_fn_inputs[{name!r}]", f"data[0].loss_fn_inputs.{name}")


def test_dro_still_needs_beta():
    spec = registry.loss_spec("dro")
    assert registry.loss_request_problem("dro", {}, _data(spec)) == (
        "the dro loss needs loss_fn_config['beta']", "loss_fn_config")


# ------------------------------------------------------------------- the RL data path

@pytest.mark.parametrize("name", registry.POLICY_LOSSES)
def test_rl_loss_fn_config_covers_every_policy_loss(name):
    spec = registry.loss_spec(name)
    config = data_processing.loss_fn_config(name)
    assert set(config or {}) == set(spec.config_keys)
    assert registry.loss_request_problem(name, config, _data(spec)) is None


def test_rl_loss_fn_config_refuses_non_policy_losses():
    for spec in SPECS:
        if not spec.policy:
            with pytest.raises(ValueError, match="unknown RL loss"):
                data_processing.loss_fn_config(spec.name)


# ----------------------------------------- the one sample-request check (server/engine/sampler.py)
# Not a loss, but the same rule (one check, two callers): the server's runner builds each
# request with sample_request_from_args, Engine.sample re-checks with sample_request_problem.

def _base(vocab_size=100, max_length=16):
    return SimpleNamespace(vocab_size=vocab_size, max_length=max_length, eos_token_ids=[99])


@pytest.mark.parametrize("args,where,message", [
    ({"prompt": []}, "prompt", "prompt is empty"),
    ({"prompt": [1, 100]}, "prompt", r"prompt token outside the vocabulary \[0, 100\)"),
    ({"prompt": [-1]}, "prompt", "outside the vocabulary"),
    ({"prompt": [1], "num_samples": 0}, "num_samples", "num_samples must be >= 1, got 0"),
    ({"prompt": [1] * 16}, "prompt", "prompt of 16 tokens leaves no room in the context of 16"),
    ({"prompt": [1] * 10, "sampling_params": {"max_tokens": 7}}, "sampling_params.max_tokens",
     r"max_tokens must be in \[1, 6\] for this prompt, got 7"),
    ({"prompt": [1], "sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens", "got 0"),
    ({"prompt": [1], "sampling_params": {"stop": [1, "a"]}}, "sampling_params.stop", "stop must be"),
    ({"prompt": [1], "sampling_params": {"top_p": 0.0}}, "sampling_params.top_p", r"top_p must be in \(0, 1\]"),
    ({"prompt": [1], "sampling_params": {"temperature": -1}}, "sampling_params.temperature",
     "temperature must be >= 0"),
])
def test_sample_request_from_args_names_the_field(args, where, message):
    from server.engine.engine import EngineInputError
    from server.engine.sampler import sample_request_from_args

    with pytest.raises(EngineInputError, match=message) as info:
        sample_request_from_args(args, _base(), None, lambda: 0)
    assert info.value.where == where


def test_sample_request_from_args_defaults_and_stops():
    from server.engine.sampler import SampleRequest, sample_request_from_args, sample_request_problem

    req = sample_request_from_args({"prompt": np.array([3, 4])}, _base(), 5, lambda: 123)
    assert req == SampleRequest(slot=5, prompt=[3, 4], num_samples=1, max_tokens=14, seed=123,
                                stop_token_ids=[99])
    assert sample_request_problem(req, 100, 16) is None  # prompt + max_tokens may fill the context
    req = sample_request_from_args({"prompt": [3], "num_samples": 2, "sampling_params": {
        "max_tokens": 4, "stop": ["\n"], "seed": 7, "temperature": 0.0, "top_k": 5, "top_p": 0.5}},
        _base(), None, lambda: 0)
    assert (req.num_samples, req.max_tokens, req.seed, req.stop_strings, req.stop_token_ids) == (2, 4, 7, ["\n"], [99])
    assert (req.temperature, req.top_k, req.top_p) == (0.0, 5, 0.5)
    assert sample_request_from_args({"prompt": [3], "sampling_params": {"stop": [5, 6]}},
                                    _base(), None, lambda: 0).stop_token_ids == [5, 6]
