"""Renderers: chat messages -> tokens + loss weights, per model family (cookbook-shaped).

    from workbench import renderers
    tokenizer = training_client.get_tokenizer()
    renderer = renderers.get_renderer(renderers.get_recommended_renderer_name("tiny-qwen3"), tokenizer)
    model_input, weights = renderer.build_supervised_example(messages)   # weights: list[float]
    prompt = renderer.build_generation_prompt(messages[:-1])
    params = SamplingParams(max_tokens=64, temperature=0.0, stop=renderer.get_stop_sequences())
    message, ok = renderer.parse_response(sampled.tokens)

Names: "qwen3", "qwen3_disable_thinking", "llama3", "smollm2" (ChatML with SmolLM2's default
system prompt), "role_colon" (any tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .base import Message, RenderContext, RenderedMessage, Renderer, TrainOnWhat
from .llama3 import Llama3Renderer
from .qwen3 import Qwen3DisableThinkingRenderer, Qwen3Renderer
from .role_colon import RoleColonRenderer
from .smollm2 import DEFAULT_SYSTEM_PROMPT as SMOLLM2_SYSTEM_PROMPT, SmolLM2Renderer

__all__ = [
    "Llama3Renderer", "Message", "Qwen3DisableThinkingRenderer", "Qwen3Renderer", "RenderContext",
    "RenderedMessage", "Renderer", "RoleColonRenderer", "SmolLM2Renderer", "TrainOnWhat",
    "get_recommended_renderer_name",
    "get_renderer", "register_renderer", "renderer_names",
]

_REGISTRY: dict[str, Callable[[Any], Renderer]] = {
    "qwen3": Qwen3Renderer,
    "qwen3_disable_thinking": Qwen3DisableThinkingRenderer,
    "llama3": Llama3Renderer,
    "smollm2": SmolLM2Renderer,
    "role_colon": RoleColonRenderer,
}


def register_renderer(name: str, factory: Callable[[Any], Renderer]) -> None:
    """Make `get_renderer(name, tokenizer)` return `factory(tokenizer)`."""
    _REGISTRY[name] = factory


def renderer_names() -> list[str]:
    return sorted(_REGISTRY)


def get_renderer(name: str, tokenizer: Any) -> Renderer:
    """The renderer called `name` for `tokenizer` (a Hugging Face tokenizer)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown renderer {name!r}; available: {', '.join(renderer_names())}")
    return _REGISTRY[name](tokenizer)


def get_recommended_renderer_name(model_name: str) -> str:
    """The renderer matching a base model's chat template; "role_colon" when unknown.

    tiny-qwen3 and Qwen/Qwen3-* -> qwen3; tiny-llama and meta-llama/Llama-3* -> llama3;
    smollm2-135m, HuggingFaceTB/SmolLM2-* and SmolLM2 GGUF files (`SmolLM2-*.gguf`) ->
    smollm2. A local model directory is judged by its config.json (`model_type` qwen3 ->
    qwen3, llama with Llama 3's 128256-token vocabulary -> llama3) and its chat template
    (SmolLM2's default system prompt -> smollm2).
    """
    name = model_name.rstrip("/")
    base = name.split("/")[-1].lower()
    if name == "tiny-qwen3" or base.startswith("qwen3-") or base == "qwen3":
        return "qwen3"
    if name == "tiny-llama" or base.startswith(("llama-3", "meta-llama-3")):
        return "llama3"
    if base.startswith("smollm2"):
        return "smollm2"
    config_path = Path(model_name) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("model_type") == "qwen3":
            return "qwen3"
        if config.get("model_type") == "llama" and config.get("vocab_size") == 128256:
            return "llama3"
        if _chat_template_mentions(Path(model_name), SMOLLM2_SYSTEM_PROMPT):
            return "smollm2"
    return "role_colon"


def _chat_template_mentions(folder: Path, text: str) -> bool:
    """Whether the directory's chat template (chat_template.jinja, or tokenizer_config.json's
    chat_template) contains `text`."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and text in jinja.read_text(errors="replace"):
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            template = json.loads(tokenizer_config.read_text()).get("chat_template")
        except (ValueError, OSError):
            return False
        return text in json.dumps(template)
    return False
