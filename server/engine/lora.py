"""Multi-LoRA linear layers: many adapters on one frozen base projection.

`MultiLoRALinear` replaces a targeted `nn.Linear` (q/k/v/o, gate/up/down, lm_head). It holds
any number of adapters (slots); in one forward pass every token uses the adapter of the
sequence it belongs to. The engine sorts work by adapter so each adapter owns contiguous
spans of the flattened [rows * tokens] dimension; routing is a list of
``(slot, start, end)`` spans over that flattened dimension. Tokens outside every span (or
whose adapter does not train this layer's group) see the base model only.

Initialisation and scaling follow PEFT's LoRA (`lora_A` Kaiming-uniform with a = sqrt(5),
`lora_B` zeros, scaling = alpha / r), so an exported adapter loaded with
`peft.PeftModel.from_pretrained` reproduces the engine's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

# Which projection names belong to which trainable group (Tinker's train_attn / train_mlp /
# train_unembed). Any causal LM with these usual names works.
GROUP_OF_MODULE = {
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "lm_head": "unembed",
}

Span = tuple[int, int, int]  # (slot, start, end) over the flattened leading dimensions


@dataclass
class LoRAPair:
    """One adapter's weights in one layer. Master weights are fp32 on every device."""

    lora_A: torch.Tensor  # [r, in_features]
    lora_B: torch.Tensor  # [out_features, r]
    scaling: float


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


@dataclass
class RoutePlan:
    """Where one layer's routed tokens lie, as tensors ready for one grouped matmul.

    Segments are the spans whose slot this layer holds, in span order. `lo:hi` is set when
    those segments tile one contiguous token range in order (the usual case: the engine
    sorts work by slot), so no gather is needed; otherwise `index` lists their tokens.
    """

    slots: tuple[int, ...]  # one per segment
    offs: torch.Tensor  # int32 [S] cumulative segment ends over the routed tokens
    index: Optional[torch.Tensor]  # int64 [M] flattened token positions, or None
    lo: int
    hi: int
    sizes: tuple[int, ...] = ()  # tokens per segment, on the host
    _layout: Optional[tuple] = field(default=None, repr=False)

    @property
    def padded_tokens(self) -> int:
        """S * the largest segment: the rows of the segment-batched (bmm) layout."""
        return len(self.sizes) * max(self.sizes)

    def segment_layout(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(gather [S*m_max], keep [M]) between the routed tokens and a [S, m_max] layout
        where segment s owns row block s, or (None, None) when every segment has the same
        size (the layout is then a view). `gather` fills a short segment's padding with
        its own first token (any real token would do: padding rows are computed, then
        dropped); `keep` picks the real rows back out, in routed-token order."""
        if self._layout is None:
            m_max = max(self.sizes)
            if all(n == m_max for n in self.sizes):
                self._layout = (None, None)
            else:
                gather, keep, start = [], [], 0
                for s, n in enumerate(self.sizes):
                    gather += list(range(start, start + n)) + [start] * (m_max - n)
                    keep += range(s * m_max, s * m_max + n)
                    start += n
                device = self.offs.device
                self._layout = (torch.tensor(gather, device=device), torch.tensor(keep, device=device))
        return self._layout


def make_route_plan(spans: Sequence[Span], device: torch.device) -> Optional[RoutePlan]:
    spans = [(slot, s, e) for slot, s, e in spans if e > s]
    if not spans:
        return None
    ends, total = [], 0
    for _, s, e in spans:
        total += e - s
        ends.append(total)
    contiguous = all(spans[i][2] == spans[i + 1][1] for i in range(len(spans) - 1))
    index = None
    if not contiguous:
        index = torch.cat([torch.arange(s, e) for _, s, e in spans]).to(device)
    return RoutePlan(
        slots=tuple(slot for slot, _, _ in spans),
        offs=torch.tensor(ends, dtype=torch.int32).to(device),
        index=index,
        lo=spans[0][1],
        hi=spans[-1][2],
        sizes=tuple(e - s for _, s, e in spans),
    )


# Passes without gradients whose segment-batched layout (segments x largest segment, see
# SegmentBmm) has at most this many rows take batched matmuls instead
# of the grouped kernel; on CPU also larger ones whose padding at most doubles the rows.
# From benchmarks/bench_decode.py --device cpu and a CPU micro-benchmark (torch 2.13): bmm
# beat torch._grouped_mm at every size tried, 16 to 16384 rows x 1 to 8 segments (2-7x).
SEGMENT_BMM_MAX_TOKENS = 4096

LORA_IMPLS = ("auto", "loop", "grouped")


def resolve_lora_impl(impl: str) -> str:
    """Check a LoRA implementation name; 'auto' stays 'auto' (chosen per pass, see
    MultiLoRALinear.pass_impl) unless this torch lacks torch._grouped_mm ('loop' then)."""
    if impl not in LORA_IMPLS:
        raise ValueError(f"lora_impl must be one of {', '.join(LORA_IMPLS)}, got {impl!r}")
    if impl == "auto" and not hasattr(torch, "_grouped_mm"):
        return "loop"
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        raise ValueError("lora_impl 'grouped' needs torch._grouped_mm, which this torch lacks")
    return impl


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # t.to(dtype) returns t itself when the dtype matches, but only after a trip through the
    # dispatcher (~1 us); the training path makes thousands of these calls per step.
    return t if t.dtype == dtype else t.to(dtype)


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


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of LoRA adapters, routed per token.

    Two implementations of the adapter math, chosen by `impl`, give the same result:
      * "grouped": every adapter of the pass in one `torch._grouped_mm` per factor (A, then
        B), the adapters' weights stacked [S, in, r_max] / [S, r_max, out] (zero-padded to
        the largest rank, scaling folded into B). No Python loop over adapters in the math.
        Without gradients, up to a size, two torch.bmm over the same stacks instead
        (SegmentBmm).
      * "loop": one pair of matmuls per adapter span (PEFT's own arithmetic), the base
        projection and every span in one autograd node (`_SegmentLoRALinear`).
      * "auto" picks per pass (`pass_impl`): grouped on CUDA; on a CPU, where torch's grouped
        kernel is itself a loop of matmuls, the loop for passes with gradients and grouped
        (the segment-batched bmm) for passes without.
    """

    def __init__(self, base: nn.Linear, name: str, group: str):
        super().__init__()
        # Frozen here, once: the loop's autograd node (_SegmentLoRALinear) gives the base
        # weight no gradient.
        self.base = base.requires_grad_(False)
        self.name = name  # module path inside the model, e.g. model.layers.0.self_attn.q_proj
        self.group = group
        self.in_features = base.in_features
        self.out_features = base.out_features
        # Adapter state lives in a plain dict, not in nn.Module parameters: adapters come and
        # go at run time and are owned (and optimised) by the engine, one set per slot.
        self.adapters: dict[int, LoRAPair] = {}
        # Routing of the current pass, set by LoRARouting: spans over flattened tokens, or
        # (per_row=True) over rows, scaled by each input's own row length. The sampler needs
        # rows because the lm_head sees fewer positions than the other layers.
        self.spans: Sequence[Span] = ()
        self.per_row = False
        self.routing: Optional["LoRARouting"] = None  # holds per-pass caches
        self.impl = resolve_lora_impl("auto")

    @property
    def weight(self) -> torch.Tensor:  # transformers reads lm_head.weight in a few places
        return self.base.weight

    def add_adapter(self, slot: int, pair: LoRAPair) -> None:
        self.adapters[slot] = pair

    def remove_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None and not torch.is_grad_enabled():
            return self._forward_prepared(x)
        return self.forward_spans(x, self._pass_spans(x))

    def _pass_spans(self, x: torch.Tensor) -> Sequence[Span]:
        """This pass's spans over x's flattened tokens."""
        spans = self.spans
        if self.per_row and spans:
            tokens_per_row = x.shape[-2]
            spans = [(slot, s * tokens_per_row, e * tokens_per_row) for slot, s, e in spans]
        return spans

    def _forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """forward without gradients under a LoRARouting: the layer's routing work (active
        spans, plan, stacked factors) is done on its first call with this input shape and
        kept by the routing for the pass, so a decode step pays only the matmuls, which at
        a handful of rows are of the same order as that Python work."""
        key = (self.name, x.shape, x.dtype)
        prepared = self.routing.prepared.get(key, _UNPREPARED)
        if prepared is _UNPREPARED:
            prepared = self.routing.prepared[key] = self._prepare(x)
        if prepared is _GENERAL:
            return self.forward_spans(x, self._pass_spans(x))
        out = nn.functional.linear(x, self.base.weight, self.base.bias)  # = self.base(x), sans hooks
        if prepared is not None:
            prepared.add(x, out, self.routing.shared_h)
        return out

    def _prepare(self, x: torch.Tensor):
        """What _forward_prepared does for inputs shaped like x: None (no routed token has
        an adapter in this layer: base only), a SegmentBmm, or _GENERAL (forward_spans)."""
        active = tuple((slot, s, e) for slot, s, e in self._pass_spans(x) if slot in self.adapters and e > s)
        if not active:
            return None
        if self.pass_impl(x) != "grouped":
            return _GENERAL
        plan = self.routing.plan(active, x.device)
        if not _segment_bmm_ok(plan, x.device):
            return _GENERAL
        return self._segment_bmm(plan, x.dtype, siblings=_shared_input_siblings(self, self.routing.layers))

    def forward_spans(self, x: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
        active = tuple((slot, s, e) for slot, s, e in spans if slot in self.adapters and e > s)
        if not active:
            return self.base(x)
        if self.pass_impl(x) == "grouped":
            out = self.base(x)
            self._add_grouped(x, out, active)
            return out
        return self._loop(x, active)

    def pass_impl(self, x: torch.Tensor) -> str:
        """The implementation this pass runs: `impl`, with "auto" resolved for the device
        and for whether gradients are wanted; grouped only where torch's kernel takes it."""
        impl = self.impl
        if impl == "auto":
            impl = "loop" if x.device.type == "cpu" and torch.is_grad_enabled() else "grouped"
        return impl if impl == "loop" or self._grouped_ok(x) else "loop"

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """Grouped GEMM needs 16-byte aligned rows (odd sizes such as a vocab of 50257 loop),
        and on CUDA bf16 inputs (torch's kernel and its meta checks are bf16-only there)."""
        align = 16 // x.dtype.itemsize
        if self.in_features % align or self.out_features % align:
            return False
        return x.device.type != "cuda" or x.dtype == torch.bfloat16

    def _loop(self, x: torch.Tensor, active: Sequence[Span]) -> torch.Tensor:
        pairs = [self.adapters[slot] for slot, _, _ in active]
        return _SegmentLoRALinear.apply(
            x, self.base.weight, self.base.bias, tuple((s, e) for _, s, e in active),
            tuple(p.scaling for p in pairs), *[t for p in pairs for t in (p.lora_A, p.lora_B)])

    def _add_grouped(self, x: torch.Tensor, out: torch.Tensor, active: tuple[Span, ...]) -> None:
        routing = self.routing
        plan = routing.plan(active, x.device) if routing else make_route_plan(active, x.device)
        if not torch.is_grad_enabled() and _segment_bmm_ok(plan, x.device):
            self._segment_bmm(plan, x.dtype).add(x, out)
            return
        a_t, b_t = self._stacks(plan.slots, x.dtype)
        x_flat = x.reshape(-1, self.in_features)  # [N, in]
        out_flat = out.reshape(-1, self.out_features)  # [N, out], a view of `out`
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

    def _segment_bmm(self, plan: RoutePlan, dtype: torch.dtype,
                     siblings: Optional[tuple[str, ...]] = None) -> "SegmentBmm":
        """This layer's SegmentBmm for `plan`: its factors [S, in, r] / [S, r, out] made
        contiguous (bmm is ~25% faster on them than on _stacks's transposed views). With
        `siblings` (layer names that take the same input, this one included) whose adapters
        cover the same slots, A is a column block of all of theirs side by side, so the
        first of them to run computes every sibling's x @ A in one matmul."""
        a_t, b_t = self._stacks(plan.slots, dtype)
        cache = self.routing.stack_cache if self.routing is not None else {}
        key = ("bmm", self.name, plan.slots, dtype)
        if key not in cache:
            cache[key] = (a_t.contiguous(), b_t.contiguous())
        a, b = cache[key]
        if not siblings or any(set(plan.slots) - set(self.routing.layers[n].adapters) for n in siblings):
            return SegmentBmm(plan, a, b)
        shared_key = ("bmm-shared", siblings, plan.slots, dtype)
        if shared_key not in cache:
            parts = [self.routing.layers[n]._stacks(plan.slots, dtype)[0] for n in siblings]
            cache[shared_key] = (torch.cat(parts, dim=2), [p.shape[2] for p in parts])  # [S, in, sum r]
        a_cat, ranks = cache[shared_key]
        start = sum(ranks[:siblings.index(self.name)])
        return SegmentBmm(plan, a_cat[:, :, start:start + a.shape[2]], b,
                          shared=((siblings, plan.slots), a_cat, start))

    def _stacks(self, slots: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """([S, in, r_max], [S, r_max, out]) for the given slots, differentiable to each pair.

        Built from the adapters' own tensors every pass (so autograd lands gradients in them
        and AdamW steps them); cached for the pass only when no gradient is wanted.
        """
        cache = self.routing.stack_cache if self.routing is not None and not torch.is_grad_enabled() else None
        key = (self.name, slots, dtype)
        if cache is not None and key in cache:
            return cache[key]
        pairs = [self.adapters[slot] for slot in slots]
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

    plan: RoutePlan
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


# Sets of projections that take the same input tensor in the usual decoder layer.
SHARED_INPUT_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_UNPREPARED = object()  # MultiLoRALinear._forward_prepared: not prepared yet
_GENERAL = object()  # MultiLoRALinear._forward_prepared: take forward_spans


def _shared_input_siblings(layer: MultiLoRALinear, layers: dict) -> Optional[tuple[str, ...]]:
    """Names of the layers in `layer`'s shared-input set (itself included) when all of them
    are wrapped here, else None. Only a hint: sharing also needs the same input tensor at
    run time (SegmentBmm._h checks)."""
    parent, _, leaf = layer.name.rpartition(".")
    for names in SHARED_INPUT_SETS:
        if leaf in names:
            full = tuple(f"{parent}.{n}" if parent else n for n in names)
            return full if all(n in layers for n in full) else None
    return None


def _segment_bmm_ok(plan: RoutePlan, device: torch.device) -> bool:
    """Whether a pass without gradients takes SegmentBmm (else the grouped kernel)."""
    padded = plan.padded_tokens
    if padded <= SEGMENT_BMM_MAX_TOKENS:
        return True
    return device.type == "cpu" and padded <= 2 * sum(plan.sizes)


def _pad_rank(t: torch.Tensor, r_max: int, dim: int) -> torch.Tensor:
    """Zero-pad a LoRA factor's rank dimension; zero rank components add exactly 0."""
    missing = r_max - t.shape[dim]
    if missing == 0:
        return t
    pad = (0, 0, 0, missing) if dim == 0 else (0, missing)
    return torch.nn.functional.pad(t, pad)


def init_lora_pair(
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    generator: torch.Generator,
    device: torch.device,
) -> LoRAPair:
    """PEFT's default LoRA init (init_lora_weights=True), drawn from `generator`."""
    lora_A = torch.empty(rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    lora_B = torch.zeros(out_features, rank, dtype=torch.float32)
    return LoRAPair(
        lora_A=lora_A.to(device).requires_grad_(True),
        lora_B=lora_B.to(device).requires_grad_(True),
        scaling=alpha / rank,
    )


def wrap_linear_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """Replace every targeted nn.Linear in `model` by a MultiLoRALinear (in place)."""
    targets = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in GROUP_OF_MODULE and isinstance(module, nn.Linear):
            targets.append((name, module, GROUP_OF_MODULE[leaf]))
    layers: dict[str, MultiLoRALinear] = {}
    for name, module, group in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoRALinear(module, name, group)
        setattr(parent, leaf, wrapped)
        layers[name] = wrapped
    if not layers:
        raise ValueError(
            "found no projection layers to adapt; expected modules named "
            + ", ".join(sorted(GROUP_OF_MODULE))
        )
    return layers


class LoRARouting:
    """Context manager that routes one forward pass's tokens to their adapters.

    It also keeps the pass's caches: route plans (shared by every layer with the same
    spans) and, when no gradient is wanted, the stacked adapter weights and each layer's
    prepared SegmentBmm. The sampler enters one LoRARouting per decode step and reuses the
    object, so the caches live across steps; adapters (their weights, and which slots each
    layer holds) must not change while it is in use.
    """

    def __init__(self, layers: dict[str, MultiLoRALinear], spans: Sequence[Span], per_row: bool = False):
        self.layers = layers
        self.spans = tuple(spans)
        self.per_row = per_row
        self.plans: dict[tuple, RoutePlan] = {}
        self.stack_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # No-grad forward: each layer's prepared work per input shape (depends on the spans,
        # so `spans` assignment clears it), and siblings' shared x @ A (cleared every pass).
        self.prepared: dict[tuple, object] = {}
        self.shared_h: dict[tuple, tuple] = {}

    @property
    def spans(self) -> tuple[Span, ...]:
        return self._spans

    @spans.setter
    def spans(self, spans: Sequence[Span]) -> None:
        self._spans = tuple(spans)
        self.prepared = {}

    def plan(self, active: tuple[Span, ...], device: torch.device) -> RoutePlan:
        if active not in self.plans:
            self.plans[active] = make_route_plan(active, device)
        return self.plans[active]

    def __enter__(self) -> "LoRARouting":
        self.shared_h = {}
        for layer in self.layers.values():
            _set_route(layer, self.spans, self.per_row, self)
        return self

    def __exit__(self, *exc) -> None:
        self.shared_h = {}  # drop the last pass's inputs and products
        for layer in self.layers.values():
            _set_route(layer, (), False, None)


def _set_route(layer: MultiLoRALinear, spans: tuple, per_row: bool, routing: Optional[LoRARouting]) -> None:
    # Plain attributes set past nn.Module.__setattr__ (which checks parameters, buffers and
    # submodules first): the sampler sets them on every layer twice per decode step.
    object.__setattr__(layer, "spans", spans)
    object.__setattr__(layer, "per_row", per_row)
    object.__setattr__(layer, "routing", routing)


def spans_for_rows(row_slots: Sequence[Optional[int]]) -> list[Span]:
    """Row spans (for LoRARouting(per_row=True)) of a batch whose rows are grouped by slot."""
    spans: list[Span] = []
    row = 0
    while row < len(row_slots):
        slot = row_slots[row]
        end = row
        while end < len(row_slots) and row_slots[end] == slot:
            end += 1
        if slot is not None:
            spans.append((slot, row, end))
        row = end
    return spans
