"""The Renderer contract: chat messages -> tokens and per-token loss weights.

A renderer writes a conversation the way the model's chat template does, as a list of text
segments that each carry a loss weight (header: 0; the turn the model produces: 1; the
separator after a turn's end token: 0). The text is tokenized in ONE call, exactly as
`tokenizer.apply_chat_template` tokenizes its rendered string, and every token takes the
weight of the segment its first character lies in. Tokenizing segment by segment instead
would differ from the template wherever the pre-tokenizer joins whitespace across a segment
border (GPT-2-style regexes do: "\\n\\n" alone is one piece, "\\n\\nHi" is three).

Concrete renderers (qwen3.py, llama3.py, role_colon.py) implement four small methods:
`render_message`, `generation_header`, `get_stop_sequences` and `parse_response`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, Optional, TypedDict

from ..types import ModelInput


class Message(TypedDict):
    """One chat message. `content` is plain text (Qwen3 reasoning stays inline as
    `<think>...</think>`, the way its chat template reads it)."""

    role: str
    content: str


class TrainOnWhat(StrEnum):
    """Which messages' outputs get loss weight 1 in `build_supervised_example`.

    Headers (role markers) get weight 0 except under ALL_TOKENS. A message's output is its
    content plus its end-of-turn token(s): what the model must produce to write that turn.
    """

    LAST_ASSISTANT_MESSAGE = "last_assistant_message"  # the final message, if assistant
    LAST_ASSISTANT_TURN = "last_assistant_turn"  # assistant messages after the last user one
    ALL_ASSISTANT_MESSAGES = "all_assistant_messages"
    ALL_MESSAGES = "all_messages"  # every message's output, whatever its role
    ALL_TOKENS = "all_tokens"  # everything, headers and separators included
    ALL_USER_AND_SYSTEM_MESSAGES = "all_user_and_system_messages"
    CUSTOMIZED = "customized"  # each message says so itself with a bool "trainable" key


@dataclass(frozen=True)
class RenderContext:
    """Where a message sits in the conversation being rendered."""

    idx: int  # position in the message list
    is_last: bool  # last message of the list (the template's `loop.last`)
    last_user_index: int  # index of the last user message, -1 if none


@dataclass(frozen=True)
class RenderedMessage:
    """A message as text, split by what the model is trained to produce.

    header: what introduces the turn (role markers); the model is given it, never trained on it.
    output: what the model writes for this turn, its end-of-turn token included.
    tail: text after the end-of-turn token that the template writes but the model never
        generates (Qwen's "\\n" after <|im_end|>); weight 0.
    stop_overlap: written only after the LAST message, weighted like its output: the part of
        a string stop sequence that the next header would otherwise supply (role_colon's
        "User:" completing the "\\n\\nUser:" stop).
    """

    header: str
    output: str
    tail: str = ""
    stop_overlap: str = ""


class Renderer(ABC):
    """Chat messages -> ModelInput (+ loss weights), and sampled tokens -> message."""

    #: Whether the generation prompt for a conversation prefix is always a prefix of the
    #: supervised example of the whole conversation (so that every assistant turn in one
    #: example sees the context it was sampled from). Qwen3 drops reasoning from history.
    has_extension_property: bool = True

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    # ------------------------------------------------------------ to implement

    @abstractmethod
    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        """The text of one message, split into header / output / tail."""

    @abstractmethod
    def generation_header(self, role: str, ctx: RenderContext) -> str:
        """Text appended after the messages to ask the model for a `role` turn."""

    @abstractmethod
    def get_stop_sequences(self) -> list[int] | list[str]:
        """Stop token ids (chat templates) or stop strings (role_colon) for sampling."""

    @abstractmethod
    def parse_response(self, response: list[int]) -> tuple[Message, bool]:
        """Sampled tokens -> (assistant message, ok); ok is False when the response did
        not end its turn properly (no stop sequence: truncated by max_tokens)."""

    @property
    def bos(self) -> str:
        """Text written once before the first message (a BOS token's text, or "")."""
        return ""

    # ------------------------------------------------------------------ public

    def build_generation_prompt(
        self, messages: list[Message], role: str = "assistant", prefill: Optional[str] = None
    ) -> ModelInput:
        """Tokens of `messages` followed by the header of a new `role` turn (and `prefill`).

        Equals `apply_chat_template(messages, add_generation_prompt=True)` for the
        template this renderer mirrors.
        """
        segments = [(self.bos, 0.0)] if self.bos else []
        for message, ctx in self._contexts(messages):
            rendered = self.render_message(message, ctx)
            segments += [(rendered.header, 0.0), (rendered.output, 0.0), (rendered.tail, 0.0)]
        ctx = RenderContext(idx=len(messages), is_last=True, last_user_index=_last_user(messages))
        segments.append((self.generation_header(role, ctx), 0.0))
        if prefill:
            segments.append((prefill, 0.0))
        tokens, _ = self._tokenize(segments)
        return ModelInput.from_ints(tokens)

    def build_supervised_example(
        self,
        messages: list[Message],
        train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    ) -> tuple[ModelInput, list[float]]:
        """Tokens of the whole conversation and one loss weight per token.

        Weight 1 on the outputs of the messages `train_on_what` selects (content and
        end-of-turn token), 0 elsewhere. The tokens equal `apply_chat_template(messages)`.
        Raises ValueError if the selection trains nothing (e.g. LAST_ASSISTANT_MESSAGE on a
        conversation that does not end with an assistant message).
        """
        train_on_what = TrainOnWhat(train_on_what)
        everything = 1.0 if train_on_what == TrainOnWhat.ALL_TOKENS else 0.0
        segments = [(self.bos, everything)] if self.bos else []
        trained_any = False
        for message, ctx in self._contexts(messages):
            rendered = self.render_message(message, ctx)
            trained = _is_trained(message, ctx, train_on_what, len(messages))
            trained_any |= trained
            segments += [(rendered.header, everything), (rendered.output, float(trained))]
            if ctx.is_last and rendered.stop_overlap:
                segments.append((rendered.stop_overlap, float(trained)))
            segments.append((rendered.tail, everything))
        if not trained_any:
            roles = [m.get("role") for m in messages]
            raise ValueError(f"train_on_what={train_on_what.value} selects no message to train on "
                             f"in a conversation with roles {roles}")
        tokens, weights = self._tokenize(segments)
        return ModelInput.from_ints(tokens), weights

    # ------------------------------------------------------------------ helpers

    def _contexts(self, messages: list[Message]):
        _check_messages(messages)
        last_user = _last_user(messages)
        for idx, message in enumerate(messages):
            yield message, RenderContext(idx=idx, is_last=idx == len(messages) - 1, last_user_index=last_user)

    def _tokenize(self, segments: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
        """Tokenize the joined text in one call; each token takes its first char's weight."""
        segments = [(text, w) for text, w in segments if text]
        text = "".join(t for t, _ in segments)
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow (python) tokenizers have no offsets
            return self._tokenize_per_segment(segments)
        char_weight: list[float] = []
        for seg_text, w in segments:
            char_weight.extend([w] * len(seg_text))
        tokens = list(enc["input_ids"])
        weights = [char_weight[start] if start < len(char_weight) else 0.0
                   for start, _ in enc["offset_mapping"]]
        assert len(tokens) == len(weights)
        return tokens, weights

    def _tokenize_per_segment(self, segments: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
        tokens: list[int] = []
        weights: list[float] = []
        for text, w in segments:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            tokens += ids
            weights += [w] * len(ids)
        return tokens, weights

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{type(self).__name__} needs {text!r} to be a single token in this "
                             f"tokenizer, got {ids}: wrong renderer for this model?")
        return ids[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.tokenizer, 'name_or_path', '')!r})"


class EndOfTurnTokenRenderer(Renderer):
    """A chat template whose turns end with one special token (`end_of_turn_text`): that
    token is the stop sequence, and a response is read up to it."""

    end_of_turn_text: str

    @cached_property  # read for every sampled response: encode the text once per renderer
    def _end_of_turn(self) -> int:
        return self._single_token(self.end_of_turn_text)

    def get_stop_sequences(self) -> list[int]:
        return [self._end_of_turn]

    def _decode_turn(self, response: list[int]) -> tuple[str, bool]:
        """The text before the first end-of-turn token, and whether there was one."""
        response = list(response)
        end = self._end_of_turn
        ok = end in response
        if ok:
            response = response[: response.index(end)]
        return self.tokenizer.decode(response), ok


def _last_user(messages: list[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)


def _check_messages(messages: list[Message]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {m!r}")
        if not isinstance(m.get("content", ""), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")


def _is_trained(message: Message, ctx: RenderContext, what: TrainOnWhat, n: int) -> bool:
    is_assistant = message["role"] == "assistant"
    if what != TrainOnWhat.CUSTOMIZED and "trainable" in message:
        raise ValueError(f"messages[{ctx.idx}] has a 'trainable' key, which only "
                         "train_on_what=CUSTOMIZED reads; remove it or use CUSTOMIZED")
    if what == TrainOnWhat.LAST_ASSISTANT_MESSAGE:
        return is_assistant and ctx.idx == n - 1
    if what == TrainOnWhat.LAST_ASSISTANT_TURN:
        return is_assistant and ctx.idx > ctx.last_user_index
    if what == TrainOnWhat.ALL_ASSISTANT_MESSAGES:
        return is_assistant
    if what in (TrainOnWhat.ALL_MESSAGES, TrainOnWhat.ALL_TOKENS):
        return True
    if what == TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES:
        return message["role"] in ("user", "system")
    if "trainable" not in message:
        raise ValueError(f"train_on_what=CUSTOMIZED needs a bool 'trainable' key on every "
                         f"message; messages[{ctx.idx}] has none")
    return bool(message["trainable"])
