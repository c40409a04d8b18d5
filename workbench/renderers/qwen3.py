"""Qwen3 renderers: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`) with thinking blocks.

Mirrors Qwen3's chat template (and the built-in tiny-qwen3's, which is the same logic):

- An assistant message's reasoning is the text before `</think>` in its content; the
  template drops it from every assistant message it does not frame.
- The template FRAMES an assistant message that comes after the last user message and is
  either the last message or has reasoning: `<think>\\n{reasoning}\\n</think>\\n\\n{content}`.
  So the final assistant turn gets an empty think block even when it did not reason.
- The generation prompt is `<|im_start|>assistant\\n` (thinking on: the model writes its own
  think block); with thinking disabled it also closes an empty block for the model.
"""

from __future__ import annotations

from .base import EndOfTurnTokenRenderer, Message, RenderContext, RenderedMessage


def _split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, content) exactly as the template's Jinja string ops split them."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def _think_block(reasoning: str) -> str:
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"


class Qwen3Renderer(EndOfTurnTokenRenderer):
    """Qwen3 with thinking enabled (the template's default).

    Training on a final assistant turn teaches the model to write the (possibly empty) think
    block itself, since the generation prompt stops at `<|im_start|>assistant\\n`.
    """

    # Reasoning is dropped from history and only the final turn gets an empty block, so an
    # earlier assistant turn reads differently in a later prompt than when it was produced.
    has_extension_property = False
    close_think_block_in_prompt = False
    end_of_turn_text = "<|im_end|>"

    def _frames(self, message: Message, reasoning: str, ctx: RenderContext) -> bool:
        # Template: `loop.index0 > ns.last_query_index and (loop.last or reasoning_content)`,
        # where last_query_index defaults to the last index when there is no user message.
        last_query = ctx.last_user_index if ctx.last_user_index >= 0 else float("inf")
        return ctx.idx > last_query and (ctx.is_last or bool(reasoning))

    def render_message(self, message: Message, ctx: RenderContext) -> RenderedMessage:
        role, content = message["role"], message.get("content") or ""
        header = f"<|im_start|>{role}\n"
        if role != "assistant":
            return RenderedMessage(header=header, output=content + "<|im_end|>", tail="\n")
        reasoning, content = _split_reasoning(content)
        if not self._frames(message, reasoning, ctx):
            return RenderedMessage(header=header, output=content + "<|im_end|>", tail="\n")
        block = _think_block(reasoning)
        if self.close_think_block_in_prompt:
            if reasoning.strip("\n"):
                raise ValueError(
                    f"messages[{ctx.idx}] has reasoning, but qwen3_disable_thinking closes the think "
                    "block in the prompt (telling the model not to reason); use the qwen3 renderer "
                    "or drop the reasoning from this turn")
            # The empty block is part of the generation prompt: given, never trained.
            return RenderedMessage(header=header + block, output=content.lstrip("\n") + "<|im_end|>", tail="\n")
        return RenderedMessage(header=header, output=block + content.lstrip("\n") + "<|im_end|>", tail="\n")

    def generation_header(self, role: str, ctx: RenderContext) -> str:
        header = f"<|im_start|>{role}\n"
        if self.close_think_block_in_prompt and role == "assistant":
            header += _think_block("")
        return header

    def parse_response(self, response: list[int]) -> tuple[Message, bool]:
        """Text up to the first <|im_end|>. An empty think block (the one the template writes
        on a turn that did not reason) is removed; real reasoning stays inline."""
        text, ok = self._decode_turn(response)
        empty = _think_block("")
        if text.startswith(empty):
            text = text[len(empty):]
        return Message(role="assistant", content=text), ok


class Qwen3DisableThinkingRenderer(Qwen3Renderer):
    """Qwen3 with `enable_thinking=False`: the prompt ends in a closed, empty think block.

    Footgun: with a GPT-2-style pre-tokenizer (the tiny tokenizers) the prompt's trailing
    "</think>\\n\\n" tokenizes differently alone than when followed by the answer, exactly
    as in `apply_chat_template`; real Qwen3 tokenizers split both the same way.
    """

    close_think_block_in_prompt = True
