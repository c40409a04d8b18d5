"""Helpers shared by the engine test modules (test_engine*.py): adapters with non-zero B,
random data, a LoRA layer to test alone, and the comparison of two runs of the same work."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from server.engine.engine import AdapterConfig, EngineDatum
from server.engine.lora import MultiLoRALinear, init_lora_pair

QWEN = "tiny-qwen3"
_ids = itertools.count()


def randomize_lora_B(adapter, seed, std=0.05):
    """Give lora_B non-zero values (PEFT init has B = 0, which makes lora_A's grads 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.lora_B.copy_(torch.randn(pair.lora_B.shape, generator=g) * std)


def adapter_maker(prefix: str, b_seed_offset: int):
    """A module's `make_adapter(engine, **config) -> (id, adapter)` on tiny-qwen3: ids
    '<prefix>-N', lora_B random from seed `config['seed'] + b_seed_offset`."""

    def make_adapter(engine, **config):
        adapter_id = f"{prefix}-{next(_ids)}"
        adapter = engine.create_adapter(adapter_id, QWEN, AdapterConfig(**config))
        randomize_lora_B(adapter, config.get("seed", 0) + b_seed_offset)
        return adapter_id, adapter

    return make_adapter


def random_datum(rng, n):
    """n random tokens with their next-token targets and signed random weights."""
    tokens = rng.integers(0, 4000, n + 1)
    return EngineDatum(tokens[:-1].copy(), {
        "target_tokens": tokens[1:].copy(), "weights": rng.uniform(-1, 1, n).astype(np.float32)})


def grads(adapter):
    return [p.grad.detach().clone() for p in adapter.parameters()]


def layer_with_adapters(in_features, out_features, ranks_alphas, seed, dtype=torch.float32):
    """A MultiLoRALinear over a random frozen base, one adapter per (rank, alpha) in slots
    0, 1, ..., each with a random (non-zero) B so that it changes the output."""
    base = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False).to(dtype)
    layer = MultiLoRALinear(base, "x", "attn")
    g = torch.Generator().manual_seed(seed)
    for slot, (rank, alpha) in enumerate(ranks_alphas):
        pair = init_lora_pair(in_features, out_features, rank, alpha, g, torch.device("cpu"))
        with torch.no_grad():
            pair.lora_B.normal_(generator=g)
        layer.add_adapter(slot, pair)
    return layer


def assert_same_outcomes(got, want):
    """(forward results, grads per adapter) of two runs of the same work agree: losses,
    logprobs (1e-5) and gradients (relative 1e-5, none of them zero)."""
    (got_res, got_grads), (want_res, want_grads) = got, want
    for a, b in zip(got_res, want_res):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            np.testing.assert_allclose(lp_a, lp_b, rtol=0, atol=1e-5)
    for ga, gb in zip(got_grads, want_grads):
        for a, b in zip(ga, gb):
            assert b.norm() > 0
            assert float((a - b).norm() / b.norm()) <= 1e-5
