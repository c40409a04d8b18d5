"""The loss registry: every loss `forward` / `forward_backward` accepts, in one table.

One `LossSpec` per loss says what the loss reads (its loss_fn_inputs besides target_tokens,
and its loss_fn_config keys, which of them are required), whether it is a policy loss (it
reads the sampler's logprobs and advantages: the RL losses), and its formula in one line.
Everything else about losses is derived from `LOSS_SPECS`: the client's and the engine's
request check (`loss_request_problem`), `LOSS_INPUTS` / `LOSS_CONFIG_KEYS` (re-exported by
`workbench.types`), `POLICY_LOSSES` (the RL data path) and the losses the server reports.
The math lives in `server/engine/losses.py`, keyed by the same names; tests/test_loss_registry.py
checks that the two tables, `LossFnType` and `PolicyLossType` agree.

Adding a loss: one `LossSpec` below, its name in `LossFnType` (and in `PolicyLossType` if it
is a policy loss), and its formula in `server/engine/losses.py`.

Torch-free (the client installs without torch); numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "LOSS_CONFIG_KEYS", "LOSS_INPUTS", "LOSS_NAMES", "LOSS_REQUIRED_CONFIG", "LOSS_SPECS",
    "LossFnType", "LossSpec", "POLICY_LOSSES", "PolicyLossType", "loss_request_problem",
    "loss_spec",
]


@dataclass(frozen=True)
class LossSpec:
    """What one loss reads and means (the server's engine holds its formula)."""

    name: str
    inputs: tuple[str, ...]  # loss_fn_inputs it reads besides target_tokens
    config_keys: tuple[str, ...] = ()  # the loss_fn_config keys it reads (others are refused)
    required_config: tuple[str, ...] = ()  # of config_keys, those without a default
    defaults: Mapping[str, float] = field(default_factory=dict)  # the other keys' values when not given
    policy: bool = False  # an RL loss: reads the sampler's logprobs and advantages
    formula: str = ""  # one line: the loss as a sum over tokens (lp = target logprobs)

    def __post_init__(self):
        missing = [k for k in self.required_config if k not in self.config_keys]
        if missing:
            raise ValueError(f"loss {self.name!r}: required config {missing} not among its config_keys")
        if set(self.defaults) != set(self.config_keys) - set(self.required_config):
            raise ValueError(f"loss {self.name!r}: every config key needs a default or must be required "
                             f"(defaults {sorted(self.defaults)}, keys {list(self.config_keys)})")
        if self.policy and not {"logprobs", "advantages"} <= set(self.inputs):
            raise ValueError(f"policy loss {self.name!r} must read logprobs and advantages")


_CLIP = ("clip_low_threshold", "clip_high_threshold")
_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_POLICY_INPUTS = ("logprobs", "advantages")

# Formulas are sums over tokens (no mean); q = the sampler's logprobs, A = advantages,
# r = exp(lp - q), w = weights (reference/tinker-api.md).
LOSS_SPECS: tuple[LossSpec, ...] = (
    LossSpec("cross_entropy", ("weights",),
             formula="sum(-lp * w)   (any real w, negative too)"),
    LossSpec("importance_sampling", _POLICY_INPUTS, policy=True,
             formula="-sum(r * A)"),
    LossSpec("ppo", _POLICY_INPUTS, _CLIP, defaults=_CLIP_DEFAULTS, policy=True,
             formula="-sum(min(r * A, clip(r, lo, hi) * A))"),
    LossSpec("cispo", _POLICY_INPUTS, _CLIP, defaults=_CLIP_DEFAULTS, policy=True,
             formula="-sum(stopgrad(clip(r, lo, hi)) * lp * A)"),
    LossSpec("dro", _POLICY_INPUTS, ("beta",), required_config=("beta",), policy=True,
             formula="-sum(lp * A - 0.5 * beta * (lp - q)^2)"),
)

# Spelled out for type checkers; tests/test_loss_registry.py checks they match LOSS_SPECS.
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
PolicyLossType = Literal["importance_sampling", "ppo", "cispo", "dro"]

_BY_NAME: dict[str, LossSpec] = {spec.name: spec for spec in LOSS_SPECS}
if len(_BY_NAME) != len(LOSS_SPECS):
    raise ValueError("LOSS_SPECS names a loss twice")

LOSS_NAMES: tuple[str, ...] = tuple(_BY_NAME)
LOSS_INPUTS: dict[str, tuple[str, ...]] = {s.name: s.inputs for s in LOSS_SPECS}
LOSS_CONFIG_KEYS: dict[str, tuple[str, ...]] = {s.name: s.config_keys for s in LOSS_SPECS}
LOSS_REQUIRED_CONFIG: dict[str, tuple[str, ...]] = {s.name: s.required_config for s in LOSS_SPECS}
POLICY_LOSSES: tuple[str, ...] = tuple(s.name for s in LOSS_SPECS if s.policy)


def loss_spec(name: str) -> LossSpec:
    """The registry's record of a loss; KeyError for an unknown name."""
    return _BY_NAME[name]


def full_config(name: str, loss_fn_config: Optional[Mapping[str, float]]) -> dict[str, float]:
    """A checked request's loss_fn_config with the registry's defaults filled in: what the
    formula reads (it indexes every key it uses)."""
    return {**_BY_NAME[name].defaults, **(loss_fn_config or {})}


def loss_request_problem(
    loss_fn: str, loss_fn_config: Optional[dict], data: Sequence[tuple[int, dict[str, np.ndarray]]],
) -> Optional[tuple[str, str]]:
    """(message, where) of the first thing wrong with a forward / forward_backward request
    that can be told without the model, else None. `data` holds, per datum, its
    model_input length and its loss_fn_inputs as arrays. The one check: the client runs it
    before sending (a bad datum fails at once), the engine again on what arrives, before
    its own checks that need the model (vocabulary, context)."""
    spec = _BY_NAME.get(loss_fn)
    if spec is None:
        return f"unknown loss_fn {loss_fn!r}; choose one of {', '.join(LOSS_NAMES)}", "loss_fn"
    config = loss_fn_config or {}
    unknown = sorted(set(config) - set(spec.config_keys))
    if unknown:
        return (f"loss_fn_config keys {unknown} are not used by {loss_fn} (it reads "
                f"{list(spec.config_keys) or 'none'})", "loss_fn_config")
    for key in spec.required_config:
        if key not in config:
            return f"the {loss_fn} loss needs loss_fn_config[{key!r}]", "loss_fn_config"
    if not data:
        return "data is empty: pass at least one Datum", "data"
    for i, (n, inputs) in enumerate(data):
        if n == 0:
            return "model_input is empty", f"data[{i}].model_input"
        for name in ("target_tokens", *spec.inputs):
            if name not in inputs:
                return f"{loss_fn} needs loss_fn_inputs[{name!r}]", f"data[{i}].loss_fn_inputs.{name}"
        for name, array in inputs.items():
            where = f"data[{i}].loss_fn_inputs.{name}"
            if array.shape != (n,):
                return (f"{name} has shape {list(array.shape)}, expected [{n}] (the model_input's "
                        "length: position i predicts target i)", where)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                return (f"{name} contains NaN or inf (first at position "
                        f"{int(np.flatnonzero(~np.isfinite(array))[0])})", where)
    return None
