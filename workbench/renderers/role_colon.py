"""role_colon: a plain-text format that works with any tokenizer (no special tokens needed).

    User: What is 2+3?

    Assistant: 5

    User:

Each message is `{Role}: {content}\\n\\n`; the stop sequence is the string "\\n\\nUser:". When
the last message is trained, "User:" is appended (and trained) so the model learns to end
its turn with the whole stop string.
"""

from __future__ import annotations

from .base import Message, RenderContext, RenderedMessage, Renderer

STOP = "\n\nUser:"


class RoleColonRenderer(Renderer):
    @property
    def bos(self) -> str:
        return getattr(self.tokenizer, "bos_token", None) or ""

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        return RenderedMessage(
            header=message["role"].capitalize() + ":",
            output=" " + (message.get("content") or "") + "\n\n",
            stop_overlap="User:" if message["role"] == "assistant" else "",
        )

    def generation_header(self, role: str, ctx: RenderContext) -> str:
        return role.capitalize() + ":"

    def get_stop_sequences(self) -> list[str]:
        return [STOP]

    def parse_response(self, response: list[int]) -> tuple[Message, bool]:
        """Text before the first "\\n\\nUser:"; ok if it was there or the response ended
        with the tokenizer's EOS token (a base model ending its turn its own way)."""
        response = list(response)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        ended_with_eos = eos is not None and bool(response) and response[-1] == eos
        if ended_with_eos:
            response = response[:-1]
        text = self.tokenizer.decode(response)
        content, found, _ = text.partition(STOP)
        content = content.removeprefix(" ").removesuffix("\n\n")
        return Message(role="assistant", content=content), bool(found) or ended_with_eos
