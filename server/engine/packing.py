"""Padding-light packing of variable-length sequences into micro-batches of rows.

Sequences (from many adapters) are packed first-fit-decreasing into rows of L tokens (L =
the longest sequence, or a configured row length if larger), and rows are grouped into
micro-batches of at most `token_budget` row tokens (R * L). Positions restart at 0 for every
sequence and attention never crosses a sequence boundary (see attention.py). The tail of a
row that no sequence fills is padding: no adapter owns it, no loss reads it.

Why rows rather than one long row: attention over one row of T tokens costs T^2 (and an
explicit T x T mask), while R rows of L cost R * L^2, i.e. about sum(len_i^2) when sequences
are of similar length.

Footgun (seen with transformers 5.23 on CPU): position_ids that restart per sequence do NOT
by themselves stop attention across sequences under the sdpa or eager kernels. The engine
passes an explicit mask built from `MicroBatch.doc_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .lora import Span


class PassSequence(NamedTuple):
    """One sequence of a packed pass as the engine knows it (Engine._packed_pass keeps a
    list of them; PackedSequence.key indexes that list): which request and datum it is."""

    item: int  # index of its request (ForwardItem) in the pass
    datum: int  # index of the datum in that request's data
    tokens: np.ndarray  # int [N]
    slot: Optional[int]  # adapter slot; None = base model only


@dataclass
class PackedSequence:
    key: int  # the caller's index of this sequence (into its list of PassSequence)
    slot: Optional[int]  # adapter slot; None = base model only
    start: int  # offset in the compact [T] order of real tokens (targets, logprobs)
    length: int
    flat_start: int  # offset in the flattened [R * L] layout (row * L + column)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L] int64; padding holds pad tokens
    position_ids: torch.Tensor  # [R, L] int64, restarting per sequence (and for padding)
    doc_ids: torch.Tensor  # [R, L] int64: index of the token's sequence in `sequences`, -1 = padding
    sequences: list[PackedSequence]  # in layout order
    spans: list[Span]  # adapter routing over the flattened R * L tokens (padding in none)
    token_index: Optional[torch.Tensor]  # int64 [T]: flat position of each real token; None = no padding
    compact_spans: list[Span]  # adapter routing over the T real tokens in compact order

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return sum(s.length for s in self.sequences)

    @property
    def row_tokens(self) -> int:
        """R * L, padding included: what the budget counts."""
        return int(self.input_ids.numel())


def pack_rows(lengths: Sequence[int], order: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing: indices (from `order`) into rows of at most `row_length` tokens.

    Ties in length keep `order`. Within a row, and across rows, sequences are then laid out
    in `order` (rows sorted by their first member) so an adapter's sequences stay as close
    together as possible, which keeps LoRA routing to few spans.
    """
    rank = {i: r for r, i in enumerate(order)}
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(order, key=lambda i: (-lengths[i], rank[i])):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(row_length, lengths[i]) - lengths[i])
    for row in rows:
        row.sort(key=rank.__getitem__)
    rows.sort(key=lambda row: rank[row[0]])
    return rows


def plan_micro_batches(
    lengths: Sequence[int],
    slots: Sequence[Optional[int]],
    token_budget: int,
    row_length: Optional[int] = None,
) -> list[list[list[int]]]:
    """Micro-batches (lists of rows, each a list of sequence indices) under `token_budget`.

    The row length L is max(row_length, longest sequence); a micro-batch holds
    max(1, token_budget // L) rows, so R * L <= token_budget unless one row alone exceeds it.
    Sequences are ordered by adapter (then by index) before packing.
    """
    if not lengths:
        return []
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (slots[i] is None, slots[i] or 0, i))
    width = max(row_length or 0, max(lengths))
    rows = pack_rows(lengths, order, width)
    per_batch = max(1, token_budget // width)
    return [rows[b:b + per_batch] for b in range(0, len(rows), per_batch)]


def _add_span(spans: list[Span], slot: Optional[int], start: int, end: int) -> None:
    if slot is None:
        return
    if spans and spans[-1][0] == slot and spans[-1][2] == start:
        spans[-1] = (slot, spans[-1][1], end)
    else:
        spans.append((slot, start, end))


def build_micro_batch(
    rows: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    slots: Sequence[Optional[int]],
    device: torch.device,
    pad_id: int = 0,
    row_multiple: int = 1,
) -> MicroBatch:
    """Lay out the given rows (sequence indices into `tokens` / `slots`) as one micro-batch.

    The row length is the longest row's content rounded up to `row_multiple` (FlexAttention
    on CUDA wants whole blocks).
    """
    width = max(sum(len(tokens[i]) for i in row) for row in rows)
    width = -(-width // row_multiple) * row_multiple
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    doc_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    sequences: list[PackedSequence] = []
    spans: list[Span] = []
    compact_spans: list[Span] = []
    flat_index = []
    compact = 0
    for r, row in enumerate(rows):
        column = 0
        for i in row:
            n = len(tokens[i])
            input_ids[r, column:column + n] = torch.as_tensor(tokens[i], dtype=torch.long)
            position_ids[r, column:column + n] = torch.arange(n)
            doc_ids[r, column:column + n] = len(sequences)
            flat = r * width + column
            sequences.append(PackedSequence(key=i, slot=slots[i], start=compact, length=n, flat_start=flat))
            _add_span(spans, slots[i], flat, flat + n)
            _add_span(compact_spans, slots[i], compact, compact + n)
            flat_index.append(torch.arange(flat, flat + n))
            column += n
            compact += n
        # padding positions restart too, so they stay inside the rotary tables
        position_ids[r, column:] = torch.arange(width - column)
    token_index = None
    if compact != n_rows * width:
        token_index = torch.cat(flat_index).to(device)
    return MicroBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        doc_ids=doc_ids.to(device),
        sequences=sequences,
        spans=spans,
        token_index=token_index,
        compact_spans=compact_spans,
    )
