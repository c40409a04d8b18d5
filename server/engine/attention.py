"""Attention for packed rows: an explicit 4D mask (sdpa) or FlexAttention with a document mask.

A packed micro-batch is R rows of L tokens; every token carries a document id (its sequence's
index in the batch, -1 for padding). Attention is causal within a document and never crosses
documents. Two ways to get that:

  * "sdpa_mask": a [R, 1, L, L] additive mask handed to transformers as a prepared 4D mask
    (its sdpa kernel uses it as is). Costs R * L^2 memory and compute; the CPU default and the
    reference the other path is tested against.
  * "flex": torch's FlexAttention with a BlockMask built from the document ids. Fully masked
    blocks are skipped, so the cost follows sum(len_i^2) rather than L^2 per row. Compiled on
    CUDA (the default there); on CPU torch runs it unfused and forward-only (torch 2.13 has
    no FlexAttention backward on CPU), which is enough to check it against "sdpa_mask".

transformers 5.23 takes a BlockMask as a prepared 4D mask, but its own "flex_attention"
function always goes through torch.compile, which on CPU means an inductor C++ build per
shape. We register a small function of our own under ATTN_NAME instead, switched on only for
the duration of a training pass (see `attention_implementation`), so the sampler keeps sdpa.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

ATTENTION_MODES = ("auto", "sdpa_mask", "flex")
ATTN_NAME = "workbench_flex"  # our name in transformers' AttentionInterface
# FlexAttention's block size; on CUDA rows are padded to a multiple of it so the compiled
# kernel sees few distinct shapes.
FLEX_BLOCK = 128


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(mode: str, device: torch.device) -> str:
    """'auto' -> 'flex' on CUDA (when this torch has FlexAttention), else 'sdpa_mask'."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    if mode == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa_mask"
    if mode == "flex" and not flex_available():
        raise ValueError("attention 'flex' needs torch.nn.attention.flex_attention, which this torch lacks")
    return mode


def sdpa_document_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, L, L] additive mask from document ids [R, L]: 0 = attend, dtype min = masked.

    Padding (doc -1) attends causally to the row's other padding, so its softmax stays finite
    (nothing reads it, but a NaN there would poison the backward through 0 * NaN).
    """
    length = doc_ids.shape[1]
    pos = torch.arange(length, device=doc_ids.device)
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (pos[:, None] >= pos[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def flex_document_mask(doc_ids: torch.Tensor):
    """A FlexAttention BlockMask: causal within a document, nothing across documents."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = doc_ids.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(
        document_causal, B=rows, H=None, Q_LEN=length, KV_LEN=length,
        device=doc_ids.device, _compile=doc_ids.device.type == "cuda",
    )


_compiled_flex = None


def _flex_fn(device: torch.device):
    """Compiled FlexAttention on CUDA (once per process); the unfused eager one elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # dynamic=None: recompiles once on a new row shape, then goes dynamic.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [R, heads, L, head_dim]
    key: torch.Tensor,  # [R, kv_heads, L, head_dim]
    value: torch.Tensor,
    attention_mask,  # the BlockMask
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns [R, L, heads, head_dim]."""
    if kwargs.get("sliding_window"):
        raise ValueError("attention 'flex' does not implement sliding-window layers; use 'sdpa_mask'")
    if dropout:
        raise ValueError("attention 'flex' runs without dropout (the engine's models are frozen, eval mode)")
    if key.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise ValueError(
            "FlexAttention has no backward on CPU in this torch; use attention='sdpa_mask' on CPU"
        )
    flex = _flex_fn(query.device)
    out = flex(
        query, key, value, block_mask=attention_mask, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, flex_attention_forward)
        _registered = True


@contextlib.contextmanager
def attention_implementation(model: nn.Module, mode: str) -> Iterator[None]:
    """Run the model's attention with `mode` ("flex" switches to ours; else unchanged).

    transformers reads `config._attn_implementation` at every attention call; the causal LM,
    its decoder and every attention module share one config object per (sub)model.
    """
    if mode != "flex":
        yield
        return
    _register()
    configs = {
        id(m.config): m.config for m in model.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation_internal")
    }
    saved = {key: cfg._attn_implementation_internal for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation_internal = ATTN_NAME
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = saved[key]
