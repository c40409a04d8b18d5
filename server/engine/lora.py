"""Multi-LoRA linear layers: many adapters on one frozen base projection.

This module holds the adapter state (LoRAPair, MultiLoRALinear's adapters), the routing of
tokens to adapters (spans, RoutePlan, LoRARouting) and the choice of the path per pass.

`MultiLoRALinear` replaces a targeted `nn.Linear` (q/k/v/o, gate/up/down, lm_head). It holds
any number of adapters (slots); in one forward pass every token uses the adapter of the
sequence it belongs to. The engine sorts work by adapter so each adapter owns contiguous
spans of the flattened [rows * tokens] dimension; routing is a list of
``(slot, start, end)`` spans over that flattened dimension. Tokens outside every span (or
whose adapter does not train this layer's group) see the base model only.

Initialisation and scaling follow PEFT's LoRA (`lora_A` Kaiming-uniform with a = sqrt(5),
`lora_B` zeros, scaling = alpha / r), so an exported adapter loaded with
`peft.PeftModel.from_pretrained` reproduces the engine's outputs.

A layer's pass: `MultiLoRALinear.forward` -> `forward_spans`, whose `pass_impl` picks the path
(MultiLoRALinear's docstring says which runs when, "auto" included). The paths that carry
gradients, the loop and grouped GEMM, live in lora_train.py; what runs only without
gradients (the segment-batched bmm, siblings' shared x @ A, the per-pass prepare cache that
`forward` takes under a LoRARouting) in lora_decode.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .lora_decode import forward_prepared, segment_bmm, segment_bmm_ok
from .lora_train import grouped_add, loop_forward

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


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of LoRA adapters, routed per token.

    Two implementations of the adapter math, chosen by `impl`, give the same result:
      * "grouped": every adapter of the pass in one `torch._grouped_mm` per factor (A, then
        B), the adapters' weights stacked [S, in, r_max] / [S, r_max, out] (zero-padded to
        the largest rank, scaling folded into B; lora_train.grouped_add). No Python loop over
        adapters in the math. Without gradients, up to a size, two torch.bmm over the same
        stacks instead (lora_decode.SegmentBmm).
      * "loop": one pair of matmuls per adapter span (PEFT's own arithmetic), the base
        projection and every span in one autograd node (lora_train._SegmentLoRALinear).
      * "auto" picks per pass (`pass_impl`): grouped on CUDA; on a CPU, where torch's grouped
        kernel is itself a loop of matmuls, the loop for passes with gradients and grouped
        (the segment-batched bmm) for passes without.
    Every impl loops where grouped GEMM cannot take the layer (`_grouped_ok`). Without
    gradients under a LoRARouting (every engine pass), `forward` makes that choice once per
    input shape and keeps it for the pass (lora_decode.forward_prepared).
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
            return forward_prepared(self, x)
        return self.forward_spans(x, self.pass_spans(x))

    def pass_spans(self, x: torch.Tensor) -> Sequence[Span]:
        """This pass's spans over x's flattened tokens."""
        spans = self.spans
        if self.per_row and spans:
            tokens_per_row = x.shape[-2]
            spans = [(slot, s * tokens_per_row, e * tokens_per_row) for slot, s, e in spans]
        return spans

    def active_spans(self, spans: Sequence[Span]) -> tuple[Span, ...]:
        """The non-empty spans whose slot holds an adapter in this layer."""
        return tuple((slot, s, e) for slot, s, e in spans if slot in self.adapters and e > s)

    def forward_spans(self, x: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
        """The base output of x plus each span's adapter product, by this pass's impl."""
        active = self.active_spans(spans)
        if not active:
            return self.base(x)
        if self.pass_impl(x) != "grouped":
            return loop_forward(self, x, active)
        out = self.base(x)
        routing = self.routing
        plan = routing.plan(active, x.device) if routing else make_route_plan(active, x.device)
        if not torch.is_grad_enabled() and segment_bmm_ok(plan, x.device):
            segment_bmm(self, plan, x.dtype).add(x, out)
        else:
            grouped_add(self, x, out, plan)
        return out

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
