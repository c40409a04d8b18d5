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
    _masks: dict = field(default_factory=dict, repr=False)

    def segment_mask(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """[M, S*rank] ones where a routed token meets its own segment's rank components."""
        key = (rank, dtype)
        if key not in self._masks:
            # M from host-side facts, not int(offs[-1]): that would be a device sync.
            n_tokens = self.hi - self.lo if self.index is None else self.index.shape[0]
            tokens = torch.arange(n_tokens, device=self.offs.device)
            segment = torch.searchsorted(self.offs.long(), tokens, right=True)  # [M]
            column = torch.arange(len(self.slots) * rank, device=self.offs.device) // rank
            self._masks[key] = (segment[:, None] == column[None, :]).to(dtype)
        return self._masks[key]


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
    )


# Passes without gradients whose routed tokens x segments stay under this take the
# concatenated-A path of the grouped implementation (see MultiLoRALinear._concat_factors);
# from benchmarks/bench_decode.py --device cpu (torch 2.13).
CONCAT_MAX_WORK = 4096

LORA_IMPLS = ("auto", "loop", "grouped")


def resolve_lora_impl(impl: str, device: Optional[torch.device] = None) -> str:
    """Check a LoRA implementation name; 'auto' stays 'auto' (chosen per pass, see
    MultiLoRALinear.pass_impl) unless this torch lacks torch._grouped_mm ('loop' then)."""
    if impl not in LORA_IMPLS:
        raise ValueError(f"lora_impl must be one of {', '.join(LORA_IMPLS)}, got {impl!r}")
    if impl == "auto" and not hasattr(torch, "_grouped_mm"):
        return "loop"
    if impl == "grouped" and not hasattr(torch, "_grouped_mm"):
        raise ValueError("lora_impl 'grouped' needs torch._grouped_mm, which this torch lacks")
    return impl


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
    the base's with addmm_). The base weight must be frozen; it gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bounds, scalings, *factors):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.nn.functional.linear(x2, weight, bias)  # [N, out]
        hs = []  # scaling * x A^T per segment: what B's gradient needs
        for (start, end), scale, a, b in zip(bounds, scalings, factors[0::2], factors[1::2]):
            h = x2[start:end] @ a.to(x.dtype).t()  # [m, r]
            if scale != 1.0:
                h.mul_(scale)
            out[start:end].addmm_(h, b.to(x.dtype).t())
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
            grad_h = g @ b.to(g.dtype)  # [m, r], times the scaling: the gradient of x A^T
            if scale != 1.0:
                grad_h.mul_(scale)
            if grad_x is not None:
                grad_x[start:end].addmm_(grad_h, a.to(g.dtype))
            factor_grads.append((grad_h.t() @ x2[start:end]).to(a.dtype)
                                if ctx.needs_input_grad[5 + 2 * k] else None)
            factor_grads.append((g.t() @ h).to(b.dtype) if ctx.needs_input_grad[6 + 2 * k] else None)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return (grad_x, None, None, None, None, *factor_grads)


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of LoRA adapters, routed per token.

    Two implementations of the adapter math, chosen by `impl`, give the same result:
      * "grouped": every adapter of the pass in one `torch._grouped_mm` per factor (A, then
        B), the adapters' weights stacked [S, in, r_max] / [S, r_max, out] (zero-padded to
        the largest rank, scaling folded into B). No Python loop over adapters in the math.
        Without gradients and with few routed tokens (a decode step), concatenated A
        factors instead (see `_concat_factors`).
      * "loop": one pair of matmuls per adapter span (PEFT's own arithmetic); with
        gradients, the base projection and every span in one autograd node
        (`_SegmentLoRALinear`).
      * "auto" picks per pass (`pass_impl`): grouped on CUDA; on a CPU, where torch's grouped
        kernel is itself a loop of matmuls, the loop for passes with gradients and grouped
        (the concatenated path) for passes without.
    """

    def __init__(self, base: nn.Linear, name: str, group: str):
        super().__init__()
        self.base = base
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
        spans = self.spans
        if self.per_row and spans:
            tokens_per_row = x.shape[-2]
            spans = [(slot, s * tokens_per_row, e * tokens_per_row) for slot, s, e in spans]
        return self.forward_spans(x, spans)

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
        frozen_base = not any(p.requires_grad for p in self.base.parameters())
        if torch.is_grad_enabled() and frozen_base:
            factors = [t for pair in pairs for t in (pair.lora_A, pair.lora_B)]
            return _SegmentLoRALinear.apply(
                x, self.base.weight, self.base.bias, tuple((s, e) for _, s, e in active),
                tuple(p.scaling for p in pairs), *factors)
        out = self.base(x)
        x_flat = x.reshape(-1, self.in_features)  # [N, in]
        out_flat = out.reshape(-1, self.out_features)  # [N, out], a view of `out`
        for pair, (_, start, end) in zip(pairs, active):
            delta = (x_flat[start:end] @ pair.lora_A.to(x.dtype).t()) @ pair.lora_B.to(x.dtype).t()
            # In-place add on a view of the base output: autograd records it (CopySlices)
            # and the base linear's backward does not need its own output.
            out_flat[start:end].add_(delta, alpha=pair.scaling)
        return out

    def _add_grouped(self, x: torch.Tensor, out: torch.Tensor, active: tuple[Span, ...]) -> None:
        routing = self.routing
        plan = routing.plan(active, x.device) if routing else make_route_plan(active, x.device)
        a_t, b_t = self._stacks(plan.slots, x.dtype)
        x_flat = x.reshape(-1, self.in_features)  # [N, in]
        out_flat = out.reshape(-1, self.out_features)  # [N, out], a view of `out`
        if plan.index is None:
            x_sel = x_flat[plan.lo:plan.hi]  # [M, in]
        else:
            x_sel = x_flat.index_select(0, plan.index)
        if not torch.is_grad_enabled() and x_sel.shape[0] * len(plan.slots) <= CONCAT_MAX_WORK:
            h, b_cat = self._concat_factors(x_sel, plan, a_t, b_t)
            if plan.index is None:  # one fused multiply-add into the base output
                out_flat[plan.lo:plan.hi].addmm_(h, b_cat)
                return
            delta = h @ b_cat
        else:
            h = _ContiguousGrad.apply(torch._grouped_mm(x_sel, a_t, offs=plan.offs))  # [M, r_max]
            delta = _ContiguousGrad.apply(torch._grouped_mm(h, b_t, offs=plan.offs))  # [M, out]
        if plan.index is None:
            out_flat[plan.lo:plan.hi].add_(delta)
        else:
            out_flat.index_add_(0, plan.index, delta)

    def _concat_factors(self, x_sel: torch.Tensor, plan: "RoutePlan", a_t: torch.Tensor,
                        b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grouped product for few tokens (a decode step), as (h, B) with delta = h @ B:
        every token through every segment's A at once (one [M, in] x [in, S*r] matmul), the
        other segments' rank components zeroed (exact zeros, so they add exactly nothing);
        B is the segments' B stacked [S*r, out]. S times the LoRA FLOPs, but fixed-shape
        matmuls instead of a grouped kernel's per-group work, which dominates at a handful
        of rows. No autograd: used only when no gradient is wanted."""
        n_seg, _, r = a_t.shape
        cache = self.routing.stack_cache if self.routing is not None else {}
        key = ("concat", self.name, plan.slots, x_sel.dtype)
        if key not in cache:
            # [in, S*r] and [S*r, out]: segment s owns columns / rows s*r:(s+1)*r.
            cache[key] = (a_t.permute(1, 0, 2).reshape(self.in_features, n_seg * r),
                          b_t.reshape(n_seg * r, self.out_features))
        a_cat, b_cat = cache[key]
        return (x_sel @ a_cat).mul_(plan.segment_mask(r, x_sel.dtype)), b_cat

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
    spans) and, when no gradient is wanted, the stacked adapter weights. The sampler enters
    one LoRARouting per decode step and reuses the object, so the caches live across steps;
    adapter weights must not change while it is in use.
    """

    def __init__(self, layers: dict[str, MultiLoRALinear], spans: Sequence[Span], per_row: bool = False):
        self.layers = layers
        self.spans = tuple(spans)
        self.per_row = per_row
        self.plans: dict[tuple, RoutePlan] = {}
        self.stack_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def plan(self, active: tuple[Span, ...], device: torch.device) -> RoutePlan:
        if active not in self.plans:
            self.plans[active] = make_route_plan(active, device)
        return self.plans[active]

    def __enter__(self) -> "LoRARouting":
        for layer in self.layers.values():
            layer.spans = self.spans
            layer.per_row = self.per_row
            layer.routing = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            layer.spans = ()
            layer.per_row = False
            layer.routing = None


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
