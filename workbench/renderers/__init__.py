"""Renderers: chat messages -> tokens + loss weights, per model family (cookbook-shaped).

    from workbench import renderers
    tokenizer = training_client.get_tokenizer()
    renderer = renderers.get_renderer(renderers.get_recommended_renderer_name("tiny-qwen3"), tokenizer)
    model_input, weights = renderer.build_supervised_example(messages)   # weights: list[float]
    prompt = renderer.build_generation_prompt(messages[:-1])
    params = SamplingParams(max_tokens=64, temperature=0.0, stop=renderer.get_stop_sequences())
    message, ok = renderer.parse_response(sampled.tokens)

Names: "qwen3", "qwen3_disable_thinking", "llama3", "role_colon" (any tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .base import Message, RenderContext, RenderedMessage, Renderer, TrainOnWhat
from .llama3 import Llama3Renderer
from .qwen3 import Qwen3DisableThinkingRenderer, Qwen3Renderer
from .role_colon import RoleColonRenderer

__all__ = [
    "Llama3Renderer", "Message", "Qwen3DisableThinkingRenderer", "Qwen3Renderer", "RenderContext",
    "RenderedMessage", "Renderer", "RoleColonRenderer", "TrainOnWhat", "get_recommended_renderer_name",
    "get_renderer", "register_renderer", "renderer_names",
]

_REGISTRY: dict[str, Callable[[Any], Renderer]] = {
    "qwen3": Qwen3Renderer,
    "qwen3_disable_thinking": Qwen3DisableThinkingRenderer,
    "llama3": Llama3Renderer,
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

    tiny-qwen3 and Qwen/Qwen3-* -> qwen3; tiny-llama and meta-llama/Llama-3* -> llama3. A
    local model directory is judged by its config.json (`model_type` qwen3 -> qwen3, llama
    with Llama 3's 128256-token vocabulary -> llama3).
    """
    name = model_name.rstrip("/")
    base = name.split("/")[-1].lower()
    if name == "tiny-qwen3" or base.startswith("qwen3-") or base == "qwen3":
        return "qwen3"
    if name == "tiny-llama" or base.startswith(("llama-3", "meta-llama-3")):
        return "llama3"
    config_path = Path(model_name) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("model_type") == "qwen3":
            return "qwen3"
        if config.get("model_type") == "llama" and config.get("vocab_size") == 128256:
            return "llama3"
    return "role_colon"
