"""The loss formulas, keyed by the registry's names, and chunked target logprobs.

What each loss reads (loss_fn_inputs, loss_fn_config keys, which are required) and its
formula in one line are in the registry, `workbench.losses.LOSS_SPECS`; requests are checked
against it (`loss_request_problem`) before any formula runs. This module holds the math
only: `LOSSES` maps every registry name to its formula, and importing it fails if the two
differ (tests/test_loss_registry.py checks the rest: inputs and config keys each formula
reads are the registry's). A formula gets the request's config with the registry's defaults
filled in (`workbench.losses.full_config`), so it indexes every key it uses.

Every loss takes target logprobs `lp` [N] (with grad) and the matching loss_fn_inputs
(tensors of length N) and returns a scalar: a sum of per-token terms, so the tokens of
several datums, concatenated, give the sum of their losses (the engine calls each loss once
per request and micro-batch). Prompt positions are masked by weight 0 or
advantage 0.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from workbench.losses import LOSS_NAMES

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]



def cross_entropy(lp, inputs, config):
    return -(lp * inputs["weights"]).sum()


def importance_sampling(lp, inputs, config):
    ratio = torch.exp(lp - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum()


def _clip_bounds(config) -> tuple[float, float]:
    return float(config["clip_low_threshold"]), float(config["clip_high_threshold"])


def ppo(lp, inputs, config):
    low, high = _clip_bounds(config)
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    return -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv).sum()


def cispo(lp, inputs, config):
    low, high = _clip_bounds(config)
    ratio = torch.exp(lp - inputs["logprobs"]).clamp(low, high).detach()
    return -(ratio * lp * inputs["advantages"]).sum()


def dro(lp, inputs, config):
    beta = float(config["beta"])
    q = inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * beta * (lp - q) ** 2).sum()


_FORMULAS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}
if set(_FORMULAS) != set(LOSS_NAMES):
    raise RuntimeError(  # not ImportError: an optional-import guard must not swallow it
        f"loss formulas {sorted(_FORMULAS)} and the registry's losses {sorted(LOSS_NAMES)} "
        "differ: every workbench.losses.LOSS_SPECS entry needs its formula here, and only those")
# The formulas in the registry's order (the order the server reports them in).
LOSSES: dict[str, LossFn] = {name: _FORMULAS[name] for name in LOSS_NAMES}


def _chunk_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, spans
) -> torch.Tensor:
    logits = head.forward_spans(hidden, spans) if spans is not None else head(hidden)
    logits = logits.float()  # [n, V]; log-softmax in fp32 also under bf16
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def target_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    spans: Optional[list] = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """log p(targets[i] | position i) for hidden [T, H], without [T, V] logits at once.

    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory
    holds one chunk's [chunk, V] logits, not the whole batch's. The last chunk keeps its
    activations instead: backward starts with it, so its recompute would raise no peak and
    only repeat the head's largest matmul (for a batch within one chunk, all of it). `spans`
    route tokens to LoRA adapters of the head (offsets over the T tokens).
    """
    out = []
    total = hidden.shape[0]
    for start in range(0, total, chunk_tokens):
        end = min(start + chunk_tokens, total)
        chunk_spans = None
        if spans is not None:
            chunk_spans = [
                (slot, max(s, start) - start, min(e, end) - start)
                for slot, s, e in spans
                if s < end and e > start
            ]
        args = (head, hidden[start:end], targets[start:end], chunk_spans)
        if torch.is_grad_enabled() and end < total:
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
