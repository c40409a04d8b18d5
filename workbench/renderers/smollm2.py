"""SmolLM2 renderer: ChatML (`<|im_start|>role\\n{content}<|im_end|>\\n`) with SmolLM2's
default system prompt.

Mirrors SmolLM2-Instruct's chat template (as shipped in its GGUF file and on the hub):

- When the FIRST message is not a system message, the template writes a default system
  turn before it: `<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained
  by Hugging Face<|im_end|>\\n`. Here it is part of the first message's header (given, never
  trained). An empty conversation gets no system turn (the template's loop never runs).
- Content is written as is (no trimming); every turn ends with `<|im_end|>` (the model's
  EOS and the stop token) and an untrained "\\n".
- The generation prompt is `<|im_start|>assistant\\n`.
"""

from __future__ import annotations

from .base import EndOfTurnTokenRenderer, Message, RenderContext, RenderedMessage

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class SmolLM2Renderer(EndOfTurnTokenRenderer):
    end_of_turn_text = "<|im_end|>"
    default_system_prompt = DEFAULT_SYSTEM_PROMPT

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        role = message["role"]
        header = f"<|im_start|>{role}\n"
        if ctx.idx == 0 and role != "system":
            header = f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n" + header
        return RenderedMessage(header=header, output=(message.get("content") or "") + "<|im_end|>", tail="\n")

    def generation_header(self, role: str, ctx: RenderContext) -> str:
        return f"<|im_start|>{role}\n"

    def parse_response(self, response: list[int]) -> tuple[Message, bool]:
        """Text up to the first <|im_end|>; ok is False if there is none."""
        text, ok = self._decode_turn(response)
        return Message(role="assistant", content=text), ok
