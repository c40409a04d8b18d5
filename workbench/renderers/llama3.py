"""Llama 3 renderer: `<|start_header_id|>role<|end_header_id|>\\n\\n{content}<|eot_id|>`.

Mirrors the Llama 3 chat template (and the built-in tiny-llama's): BOS once, content
trimmed of surrounding whitespace (Jinja's `| trim`), no default system prompt (the 3.1+
templates' "Cutting Knowledge Date" preamble is left to the caller).
"""

from __future__ import annotations

from .base import EndOfTurnTokenRenderer, Message, RenderContext, RenderedMessage


class Llama3Renderer(EndOfTurnTokenRenderer):
    end_of_turn_text = "<|eot_id|>"

    @property
    def bos(self) -> str:
        return self.tokenizer.bos_token or "<|begin_of_text|>"

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        return RenderedMessage(header=header, output=(message.get("content") or "").strip() + "<|eot_id|>")

    def generation_header(self, role: str, ctx: RenderContext) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def parse_response(self, response: list[int]) -> tuple[Message, bool]:
        """Text up to the first <|eot_id|>; ok is False if there is none."""
        text, ok = self._decode_turn(response)
        return Message(role="assistant", content=text), ok
