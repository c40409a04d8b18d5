"""Supervised data: conversation files -> Datums -> fixed-size shuffled batches.

    conversations = load_conversations_jsonl("chats.jsonl")
    data = [conversation_to_datum(c, renderer, max_length=512) for c in conversations]
    dataset = SupervisedDataset(data, batch_size=8, seed=0)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            batch = dataset.get_batch(i)   # list[Datum]
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence, Union

from .renderers.base import Message, Renderer, TrainOnWhat
from .types import Datum, ModelInput

__all__ = [
    "SupervisedDataset", "conversation_to_datum", "datum_from_model_input_weights",
    "full_sequence", "load_conversations_jsonl", "parse_conversation", "target_logprobs",
]


def parse_conversation(obj: object) -> list[Message]:
    """A conversation from one JSON value: {"messages": [...]} or a bare list of messages.

    Raises ValueError naming what is wrong (the caller adds file and line).
    """
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]} or a non-empty list')
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is a {type(m).__name__}, expected an object")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"messages[{i}] has no string 'role'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] ({m['role']}) has no string 'content'")
        out.append(dict(m))  # type: ignore[arg-type]  (extra keys such as "trainable" kept)
    return out


def load_conversations_jsonl(path: Union[str, Path]) -> list[list[Message]]:
    """One conversation per line (blank lines skipped); a bad line raises ValueError with
    `file:line: reason`."""
    path = Path(path)
    conversations = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                conversations.append(parse_conversation(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return conversations


def datum_from_model_input_weights(
    model_input: ModelInput, weights: Sequence[float], max_length: Optional[int] = None
) -> Datum:
    """A next-token cross_entropy Datum from a whole sequence and its per-token weights.

    The sequence is first cut to its first `max_length` tokens; then input = tokens[:-1],
    target_tokens = tokens[1:], weights = weights[1:] (token i+1's weight says whether
    predicting it from the tokens before is trained).
    """
    tokens = model_input.to_ints()
    weights = [float(w) for w in weights]
    if len(weights) != len(tokens):
        raise ValueError(f"weights has {len(weights)} entries for {len(tokens)} tokens")
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        tokens, weights = tokens[:max_length], weights[:max_length]
    if len(tokens) < 2:
        raise ValueError(f"a datum needs at least 2 tokens (one input, one target), got {len(tokens)}")
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def full_sequence(datum: Datum, where: str = "datum") -> ModelInput:
    """The whole sequence a next-token datum was cut from: its input plus its last target
    (the inverse of `datum_from_model_input_weights`); what compute_logprobs scores."""
    tokens = datum.model_input.to_ints()
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    if tokens[1:] != targets[:-1]:
        raise ValueError(f"{where} is not next-token shifted (target_tokens != input[1:] + "
                         "[last]); compute_logprobs can only score such datums, use a TrainingClient")
    return ModelInput.from_ints(tokens + targets[-1:])


def target_logprobs(client, data: Sequence[Datum], where: str = "data") -> list[list[float]]:
    """Per next-token datum, a sampling client's logprob of each target token.

    Every compute_logprobs call is submitted before any is awaited, so the server scores
    them in one cycle. Entry 0 of each reply (token 0, which nothing predicts) is dropped.
    """
    futures = [client.compute_logprobs(full_sequence(d, f"{where}[{i}]")) for i, d in enumerate(data)]
    return [f.result()[1:] for f in futures]


def conversation_to_datum(
    messages: list[Message],
    renderer: Renderer,
    max_length: Optional[int] = None,
    train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
) -> Datum:
    """Render a conversation and turn it into a (truncated) next-token Datum."""
    model_input, weights = renderer.build_supervised_example(messages, train_on_what=train_on_what)
    return datum_from_model_input_weights(model_input, weights, max_length)


class SupervisedDataset:
    """Items in fixed-size batches, reshuffled per epoch from `seed` (deterministic).

    `len(dataset)` is the number of full batches per epoch; the remainder (fewer than
    `batch_size` items) is left out of that epoch, a different one each epoch.
    """

    def __init__(self, items: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(items) < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(items)} items)")
        self.items = list(items)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = list(range(len(self.items)))
        if self.shuffle:
            # A string seed is hashed deterministically by random.Random (not by hash()).
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)

    def __len__(self) -> int:
        return len(self.items) // self.batch_size

    def get_batch(self, index: int) -> list:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range (0..{len(self) - 1})")
        picked = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return [self.items[i] for i in picked]

    def __iter__(self):
        return (self.get_batch(i) for i in range(len(self)))
