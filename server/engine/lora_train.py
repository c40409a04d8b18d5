"""The LoRA paths that can carry gradients: the loop and grouped GEMM.

Both compute, for a MultiLoRALinear (lora.py) and the active spans of one pass,
y = x W^T (+ bias), then y[s:e] += scaling * (x[s:e] A^T) B^T for each adapter span, and
give the same result up to rounding. `MultiLoRALinear.forward_spans` picks one per pass
(`pass_impl`):

  * the loop (`loop_forward` -> `_SegmentLoRALinear`): one matmul pair per span, PEFT's own
    arithmetic, the base projection and every span in one autograd node with a hand-written
    backward. 'auto' takes it for passes with gradients on a CPU; every impl takes it where
    grouped GEMM cannot (sizes not 16-byte aligned, or not bf16 on CUDA); 'loop' always.
  * grouped GEMM (`grouped_add`): every adapter of the pass in one torch._grouped_mm per
    factor over the stacked factors (`stack_factors`), no Python loop over adapters in the
    math. 'auto' and 'grouped' take it for passes with gradients on CUDA (and 'grouped' on a
    CPU), and for passes without gradients too large for the segment-batched bmm
    (lora_decode.py); smaller passes without gradients go there instead.

Neither keeps state between passes; `stack_factors` caches in the pass's LoRARouting only
when no gradient is wanted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .lora import MultiLoRALinear, RoutePlan, Span


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # t.to(dtype) returns t itself when the dtype matches, but only after a trip through the
    # dispatcher (~1 us); the training path makes thousands of these calls per step.
    return t if t.dtype == dtype else t.to(dtype)


# ------------------------------------------------------------------------------ the loop

def loop_forward(layer: "MultiLoRALinear", x: torch.Tensor, active: Sequence["Span"]) -> torch.Tensor:
    """The base output of x plus every active span's adapter product: one autograd node."""
    pairs = [layer.adapters[slot] for slot, _, _ in active]
    return _SegmentLoRALinear.apply(
        x, layer.base.weight, layer.base.bias, tuple((s, e) for _, s, e in active),
        tuple(p.scaling for p in pairs), *[t for p in pairs for t in (p.lora_A, p.lora_B)])


class _SegmentLoRALinear(torch.autograd.Function):
    """y = x W^T (+ bias), then y[s:e] += scaling * (x[s:e] A^T) B^T for each adapter segment:
    a frozen base projection and its routed adapters in one autograd node, backward written
    out by hand.

    The arithmetic is PEFT's, one matmul pair per segment, with the scaling applied to the
    rank-sized factors ([m, r]) rather than to [m, out] products, so results equal the
    autograd-recorded loop up to fp32 rounding. What it saves is bookkeeping, which on a
    CPU costs as much as the small LoRA matmuls themselves: a handful of autograd nodes per
    adapter per layer, the base output's separate node, and a second [N, in] gradient that
    autograd would add to the base's (each segment's input gradient goes straight into
    the base's with addmm_). The base weight is frozen (MultiLoRALinear freezes it); it
    gets no gradient. Without gradients the same forward runs, recording nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bounds, scalings, *factors):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.nn.functional.linear(x2, weight, bias)  # [N, out]
        hs = []  # scaling * x A^T per segment: what B's gradient needs
        for (start, end), scale, a, b in zip(bounds, scalings, factors[0::2], factors[1::2]):
            h = x2[start:end] @ _as(a, x.dtype).t()  # [m, r]
            if scale != 1.0:
                h.mul_(scale)
            out[start:end].addmm_(h, _as(b, x.dtype).t())
            hs.append(h)
        ctx.bounds, ctx.scalings, ctx.n_factors, ctx.x_shape = bounds, scalings, len(factors), x.shape
        ctx.save_for_backward(x2, weight, *factors, *hs)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, *rest = ctx.saved_tensors
        factors, hs = rest[:ctx.n_factors], rest[ctx.n_factors:]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = g2 @ weight if ctx.needs_input_grad[0] else None  # [N, in]
        factor_grads = []
        for k, ((start, end), scale) in enumerate(zip(ctx.bounds, ctx.scalings)):
            a, b, h = factors[2 * k], factors[2 * k + 1], hs[k]
            g = g2[start:end]  # [m, out]
            grad_h = g @ _as(b, g.dtype)  # [m, r], times the scaling: the gradient of x A^T
            if scale != 1.0:
                grad_h.mul_(scale)
            if grad_x is not None:
                grad_x[start:end].addmm_(grad_h, _as(a, g.dtype))
            factor_grads.append(_as(grad_h.t() @ x2[start:end], a.dtype)
                                if ctx.needs_input_grad[5 + 2 * k] else None)
            factor_grads.append(_as(g.t() @ h, b.dtype) if ctx.needs_input_grad[6 + 2 * k] else None)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, None, None, *factor_grads)


# ------------------------------------------------------------------------- grouped GEMM

class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    torch._grouped_mm's backward rejects expanded (stride 0) gradients, which autograd
    produces for e.g. `out.sum().backward()`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_add(layer: "MultiLoRALinear", x: torch.Tensor, out: torch.Tensor, plan: "RoutePlan") -> None:
    """out += the adapters' product of x (out is the base output of x), every segment of
    `plan` in one torch._grouped_mm per factor; differentiable to each adapter's factors."""
    a_t, b_t = stack_factors(layer, plan.slots, x.dtype)
    x_flat = x.reshape(-1, layer.in_features)  # [N, in]
    out_flat = out.reshape(-1, layer.out_features)  # [N, out], a view of `out`
    if plan.index is None:
        x_sel = x_flat[plan.lo:plan.hi]  # [M, in]
    else:
        x_sel = x_flat.index_select(0, plan.index)
    h = _ContiguousGrad.apply(torch._grouped_mm(x_sel, a_t, offs=plan.offs))  # [M, r_max]
    delta = _ContiguousGrad.apply(torch._grouped_mm(h, b_t, offs=plan.offs))  # [M, out]
    if plan.index is None:
        out_flat[plan.lo:plan.hi].add_(delta)
    else:
        out_flat.index_add_(0, plan.index, delta)


def stack_factors(layer: "MultiLoRALinear", slots: tuple[int, ...],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """([S, in, r_max], [S, r_max, out]) of `layer`'s adapters in the given slots (zero-padded
    to the largest rank, scaling folded into B), differentiable to each pair.

    Built from the adapters' own tensors every pass (so autograd lands gradients in them
    and AdamW steps them); cached in the layer's LoRARouting for the pass only when no
    gradient is wanted.
    """
    routing = layer.routing
    cache = routing.stack_cache if routing is not None and not torch.is_grad_enabled() else None
    key = (layer.name, slots, dtype)
    if cache is not None and key in cache:
        return cache[key]
    pairs = [layer.adapters[slot] for slot in slots]
    r_max = max(p.lora_A.shape[0] for p in pairs)
    align = 16 // dtype.itemsize
    r_max = -(-r_max // align) * align  # grouped GEMM wants 16-byte aligned strides
    a = torch.stack([_pad_rank(p.lora_A, r_max, 0) for p in pairs]).to(dtype)  # [S, r, in]
    b = torch.stack([
        _pad_rank(p.lora_B if p.scaling == 1.0 else p.lora_B * p.scaling, r_max, 1) for p in pairs
    ]).to(dtype)  # [S, out, r]
    # Transposed views (column-major), the layout grouped GEMM kernels take for mat_b.
    result = (a.transpose(1, 2), b.transpose(1, 2))
    if cache is not None:
        cache[key] = result
    return result


def _pad_rank(t: torch.Tensor, r_max: int, dim: int) -> torch.Tensor:
    """Zero-pad a LoRA factor's rank dimension; zero rank components add exactly 0."""
    missing = r_max - t.shape[dim]
    if missing == 0:
        return t
    pad = (0, 0, 0, missing) if dim == 0 else (0, missing)
    return torch.nn.functional.pad(t, pad)
