"""Padding-free packing of variable-length sequences into micro-batches.

Sequences (from many adapters) are concatenated into one row per micro-batch under a
token budget. Positions restart at 0 for every sequence and attention never crosses a
sequence boundary.

Footgun (seen with transformers 5.23 on CPU): position_ids that restart per sequence do
NOT by themselves stop attention across sequences under the sdpa or eager kernels. We
pass an explicit 4D additive block-diagonal causal mask, which transformers uses as is.
The mask costs O(tokens^2) memory, hence the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .lora import Span


@dataclass
class PackedSequence:
    key: int  # the caller's index of this sequence
    slot: Optional[int]  # adapter slot; None = base model only
    start: int  # offset in the packed row
    length: int


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    attention_mask: torch.Tensor  # [1, 1, T, T] additive, 0 = attend, min = masked
    sequences: list[PackedSequence]
    spans: list[Span]  # adapter routing over the T tokens

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def plan_micro_batches(
    lengths: Sequence[int], slots: Sequence[Optional[int]], token_budget: int
) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `token_budget` tokens.

    Sequences stay grouped by adapter (so each adapter owns contiguous spans) and keep their
    order within an adapter. A sequence longer than the budget gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (slots[i] is None, slots[i] or 0, i))
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def block_causal_mask(lengths: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] additive mask: causal within each sequence, nothing across sequences."""
    total = int(sum(lengths))
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(list(lengths), device=device)
    )  # [T] sequence index of every token
    pos = torch.arange(total, device=device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])  # [T, T]
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def build_micro_batch(
    tokens: Sequence[Sequence[int]],
    keys: Sequence[int],
    slots: Sequence[Optional[int]],
    dtype: torch.dtype,
    device: torch.device,
) -> MicroBatch:
    """Pack the given sequences (already grouped by slot) into one row."""
    lengths = [len(t) for t in tokens]
    flat = [int(t) for seq in tokens for t in seq]
    input_ids = torch.tensor(flat, dtype=torch.long, device=device)[None]
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    sequences, spans = [], []
    offset = 0
    for key, slot, n in zip(keys, slots, lengths):
        sequences.append(PackedSequence(key=key, slot=slot, start=offset, length=n))
        if slot is not None:
            if spans and spans[-1][0] == slot and spans[-1][2] == offset:
                spans[-1] = (slot, spans[-1][1], offset + n)
            else:
                spans.append((slot, offset, offset + n))
        offset += n
    assert offset == input_ids.shape[1]
    return MicroBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=block_causal_mask(lengths, dtype, device),
        sequences=sequences,
        spans=spans,
    )
