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
from dataclasses import dataclass
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


class MultiLoRALinear(nn.Module):
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
        out = self.base(x)
        active = [(self.adapters[slot], s, e) for slot, s, e in spans if slot in self.adapters]
        if not active:
            return out
        x_flat = x.reshape(-1, self.in_features)  # [N, in]
        out_flat = out.reshape(-1, self.out_features)  # [N, out], a view of `out`
        for pair, start, end in active:
            x_part = x_flat[start:end]
            a = pair.lora_A.to(x.dtype)
            b = pair.lora_B.to(x.dtype)
            delta = (x_part @ a.t()) @ b.t()  # [n, out]
            # In-place add on a view of the base output: autograd records it (CopySlices)
            # and the base linear's backward does not need its own output.
            out_flat[start:end].add_(delta, alpha=pair.scaling)
        return out


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
    """Context manager that routes one forward pass's tokens to their adapters."""

    def __init__(self, layers: dict[str, MultiLoRALinear], spans: Sequence[Span], per_row: bool = False):
        self.layers = layers
        self.spans = tuple(spans)
        self.per_row = per_row

    def __enter__(self) -> "LoRARouting":
        for layer in self.layers.values():
            layer.spans = self.spans
            layer.per_row = self.per_row
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            layer.spans = ()
            layer.per_row = False


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
