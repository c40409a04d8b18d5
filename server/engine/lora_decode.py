"""The LoRA machinery of passes without gradients (decode steps, forward-only passes).

Nothing here records autograd; passes with gradients never come here (lora_train.py).

  * `SegmentBmm`: one layer's adapter product as two torch.bmm over a [segments, largest
    segment] layout of its routed tokens. The grouped impl ('auto' included, on every
    device) takes it without gradients up to SEGMENT_BMM_MAX_TOKENS padded rows, on a CPU
    also beyond while the padding at most doubles the rows (`segment_bmm_ok`); larger
    passes take grouped GEMM (lora_train.grouped_add). 'loop' never comes here.
  * shared x @ A: the projections that read one input tensor (q/k/v, gate/up) compute all
    their x @ A in one matmul, the first of them to run (`segment_bmm`, `SegmentBmm._h`).
  * the prepare cache: under a LoRARouting (every engine pass; the sampler keeps one across
    decode steps), a layer's choice for an input shape (base only, a SegmentBmm, or the
    general `forward_spans`) is made on its first call and kept for the pass
    (`forward_prepared`), so a decode step pays only the matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .lora_train import stack_factors

if TYPE_CHECKING:
    from .lora import MultiLoRALinear, RoutePlan

# Passes without gradients whose segment-batched layout (segments x largest segment, see
# SegmentBmm) has at most this many rows take batched matmuls instead
# of the grouped kernel; on CPU also larger ones whose padding at most doubles the rows.
# From benchmarks/bench_decode.py --device cpu and a CPU micro-benchmark (torch 2.13): bmm
# beat torch._grouped_mm at every size tried, 16 to 16384 rows x 1 to 8 segments (2-7x).
SEGMENT_BMM_MAX_TOKENS = 4096

# Sets of projections that take the same input tensor in the usual decoder layer.
SHARED_INPUT_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_UNPREPARED = object()  # forward_prepared: not prepared yet
_GENERAL = object()  # forward_prepared: take MultiLoRALinear.forward_spans


def segment_bmm_ok(plan: "RoutePlan", device: torch.device) -> bool:
    """Whether a pass without gradients takes SegmentBmm (else the grouped kernel)."""
    padded = plan.padded_tokens
    if padded <= SEGMENT_BMM_MAX_TOKENS:
        return True
    return device.type == "cpu" and padded <= 2 * sum(plan.sizes)


def forward_prepared(layer: "MultiLoRALinear", x: torch.Tensor) -> torch.Tensor:
    """`layer`'s forward without gradients under a LoRARouting: the layer's routing work
    (active spans, plan, stacked factors) is done on its first call with this input shape
    and kept by the routing for the pass, so a decode step pays only the matmuls, which at
    a handful of rows are of the same order as that Python work."""
    routing = layer.routing
    key = (layer.name, x.shape, x.dtype)
    prepared = routing.prepared.get(key, _UNPREPARED)
    if prepared is _UNPREPARED:
        prepared = routing.prepared[key] = _prepare(layer, x)
    if prepared is _GENERAL:
        return layer.forward_spans(x, layer.pass_spans(x))
    out = nn.functional.linear(x, layer.base.weight, layer.base.bias)  # = layer.base(x), sans hooks
    if prepared is not None:
        prepared.add(x, out, routing.shared_h)
    return out


def _prepare(layer: "MultiLoRALinear", x: torch.Tensor):
    """What forward_prepared does for inputs shaped like x: None (no routed token has an
    adapter in this layer: base only), a SegmentBmm, or _GENERAL (forward_spans)."""
    active = layer.active_spans(layer.pass_spans(x))
    if not active:
        return None
    if layer.pass_impl(x) != "grouped":
        return _GENERAL
    plan = layer.routing.plan(active, x.device)
    if not segment_bmm_ok(plan, x.device):
        return _GENERAL
    return segment_bmm(layer, plan, x.dtype, siblings=_shared_input_siblings(layer, layer.routing.layers))


def segment_bmm(layer: "MultiLoRALinear", plan: "RoutePlan", dtype: torch.dtype,
                siblings: Optional[tuple[str, ...]] = None) -> "SegmentBmm":
    """`layer`'s SegmentBmm for `plan`: its factors [S, in, r] / [S, r, out] made contiguous
    (bmm is ~25% faster on them than on stack_factors's transposed views). With `siblings`
    (layer names that take the same input, this one included) whose adapters cover the
    same slots, A is a column block of all of theirs side by side, so the first of them to
    run computes every sibling's x @ A in one matmul."""
    a_t, b_t = stack_factors(layer, plan.slots, dtype)
    routing = layer.routing
    cache = routing.stack_cache if routing is not None else {}
    key = ("bmm", layer.name, plan.slots, dtype)
    if key not in cache:
        cache[key] = (a_t.contiguous(), b_t.contiguous())
    a, b = cache[key]
    if not siblings or any(set(plan.slots) - set(routing.layers[n].adapters) for n in siblings):
        return SegmentBmm(plan, a, b)
    shared_key = ("bmm-shared", siblings, plan.slots, dtype)
    if shared_key not in cache:
        parts = [stack_factors(routing.layers[n], plan.slots, dtype)[0] for n in siblings]
        cache[shared_key] = (torch.cat(parts, dim=2), [p.shape[2] for p in parts])  # [S, in, sum r]
    a_cat, ranks = cache[shared_key]
    start = sum(ranks[:siblings.index(layer.name)])
    return SegmentBmm(plan, a_cat[:, :, start:start + a.shape[2]], b,
                      shared=((siblings, plan.slots), a_cat, start))


def _shared_input_siblings(layer: "MultiLoRALinear", layers: dict) -> Optional[tuple[str, ...]]:
    """Names of the layers in `layer`'s shared-input set (itself included) when all of them
    are wrapped here, else None. Only a hint: sharing also needs the same input tensor at
    run time (SegmentBmm._h checks)."""
    parent, _, leaf = layer.name.rpartition(".")
    for names in SHARED_INPUT_SETS:
        if leaf in names:
            full = tuple(f"{parent}.{n}" if parent else n for n in names)
            return full if all(n in layers for n in full) else None
    return None


@dataclass
class SegmentBmm:
    """One layer's adapter product without gradients, as two batched matmuls over a
    [S, m_max] layout of its routed tokens (segment s in row block s, short segments
    padded): x @ A then @ B, each token through its own segment's factors only.

    At a handful of tokens (a decode step) a grouped kernel's per-group work dominates, and
    bmm is 2-7x faster on CPU at any size (see SEGMENT_BMM_MAX_TOKENS). When segments are
    equal-sized and contiguous in the base output (a decode batch of evenly split rows) the
    layout is a view and B's product is added in place.
    """

    plan: "RoutePlan"
    a: torch.Tensor  # [S, in, r]
    b: torch.Tensor  # [S, r, out], scaling folded in
    # (key, A of all siblings [S, in, sum r], first column of this layer's block) when
    # siblings share this layer's input; `a` is then that column block.
    shared: Optional[tuple[tuple, torch.Tensor, int]] = None

    def add(self, x: torch.Tensor, out: torch.Tensor, shared_h: Optional[dict] = None) -> None:
        """out += the adapters' product of x, in place (out is the base output of x)."""
        plan, n_seg, m_max = self.plan, len(self.plan.slots), max(self.plan.sizes)
        h = self._h(x, shared_h)  # [S, m_max, r]
        out_flat = out.view(-1, out.shape[-1])  # `view`: the adds must land in `out` itself
        gather, keep = plan.segment_layout()
        if gather is None and plan.index is None:
            out_flat[plan.lo:plan.hi].view(n_seg, m_max, -1).baddbmm_(h, self.b)
            return
        delta = torch.bmm(h, self.b).view(n_seg * m_max, -1)  # [S*m_max, out]
        if keep is not None:
            delta = delta.index_select(0, keep)  # [M, out]
        if plan.index is None:
            out_flat[plan.lo:plan.hi].add_(delta)
        else:
            out_flat.index_add_(0, plan.index, delta)

    def _h(self, x: torch.Tensor, shared_h: Optional[dict]) -> torch.Tensor:
        """x @ A in the segment layout, [S, m_max, r]. With siblings, taken from the first
        sibling's product of this very tensor (same object, unmodified since: checked by
        identity and version counter, so another step's or pass's input never matches);
        the held reference keeps that object alive, so its identity cannot be reused."""
        if self.shared is None or shared_h is None or x.is_inference():
            return torch.bmm(self._x_pad(x), self.a)
        key, a_cat, start = self.shared
        hit = shared_h.get(key)
        if hit is None or hit[0] is not x or hit[1] != x._version:
            hit = shared_h[key] = (x, x._version, torch.bmm(self._x_pad(x), a_cat))
        return hit[2][:, :, start:start + self.a.shape[2]]

    def _x_pad(self, x: torch.Tensor) -> torch.Tensor:
        """x's routed tokens in the segment layout, [S, m_max, in]."""
        plan = self.plan
        x_flat = x.reshape(-1, x.shape[-1])
        x_sel = x_flat[plan.lo:plan.hi] if plan.index is None else x_flat.index_select(0, plan.index)
        gather, _ = plan.segment_layout()
        if gather is not None:
            x_sel = x_sel.index_select(0, gather)
        return x_sel.reshape(len(plan.slots), max(plan.sizes), x.shape[-1])
