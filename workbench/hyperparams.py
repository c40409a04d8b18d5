"""LoRA learning rates and learning-rate schedules.

    lr = get_lr("Qwen/Qwen3-8B")                       # 5e-5 * 10 * (2000 / 4096) ** 0.0775
    mult = cosine_with_warmup(step, total_steps=100, warmup_steps=10)
    training_client.optim_step(AdamParams(learning_rate=lr * mult))

`get_lr(model) = 5e-5 * 10 * (2000 / hidden_size) ** k` (tinker-cookbook's formula: the
full-fine-tuning rate times 10 for LoRA), with k = 0.781 for Llama-family names and 0.0775
for Qwen-family names. Schedules are plain functions of the step returning a multiplier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["constant", "cosine_with_warmup", "get_hidden_size", "get_lr", "linear_decay", "model_family"]

BASE_LR = 5e-5
LORA_MULTIPLIER = 10.0
EXPONENTS = {"llama": 0.781, "qwen": 0.0775}

#: Hidden sizes of known models, so no config (or network) is needed for them.
KNOWN_HIDDEN_SIZES: dict[str, int] = {
    "tiny-qwen3": 256,
    "tiny-llama": 256,
    "Qwen/Qwen3-0.6B": 1024,
    "Qwen/Qwen3-1.7B": 2048,
    "Qwen/Qwen3-4B": 2560,
    "Qwen/Qwen3-4B-Instruct-2507": 2560,
    "Qwen/Qwen3-8B": 4096,
    "Qwen/Qwen3-8B-Base": 4096,
    "Qwen/Qwen3-14B": 5120,
    "Qwen/Qwen3-32B": 5120,
    "Qwen/Qwen3-30B-A3B": 2048,
    "Qwen/Qwen3-30B-A3B-Base": 2048,
    "Qwen/Qwen3-30B-A3B-Instruct-2507": 2048,
    "Qwen/Qwen3-235B-A22B-Instruct-2507": 4096,
    "meta-llama/Llama-3.2-1B": 2048,
    "meta-llama/Llama-3.2-1B-Instruct": 2048,
    "meta-llama/Llama-3.2-3B": 3072,
    "meta-llama/Llama-3.2-3B-Instruct": 3072,
    "meta-llama/Meta-Llama-3-8B": 4096,
    "meta-llama/Llama-3.1-8B": 4096,
    "meta-llama/Llama-3.1-8B-Instruct": 4096,
    "meta-llama/Llama-3.1-70B": 8192,
    "meta-llama/Llama-3.3-70B-Instruct": 8192,
}


def _local_config(model_name: str) -> dict | None:
    """config.json of a local model directory, or of a hub id already in the HF cache."""
    path = Path(model_name) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if "/" in model_name and not Path(model_name).exists():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
            return None
        cached = try_to_load_from_cache(model_name, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    return None


def get_hidden_size(model_name: str) -> int:
    """The model's hidden size: from the table above, else its config.json (a local
    directory, or a hub id in the local HF cache; never downloads)."""
    if model_name in KNOWN_HIDDEN_SIZES:
        return KNOWN_HIDDEN_SIZES[model_name]
    config = _local_config(model_name)
    if config is not None:
        # Multimodal configs nest the language model's settings under text_config.
        size = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
        if isinstance(size, int) and size > 0:
            return size
        raise ValueError(f"config.json of {model_name!r} has no hidden_size")
    raise ValueError(f"hidden size of {model_name!r} unknown: not a known model, not a local "
                     "directory with config.json, and not in the local Hugging Face cache")


def model_family(model_name: str) -> str:
    """"llama" or "qwen", from the name (or a local directory's config model_type)."""
    lowered = model_name.lower()
    for family in ("llama", "qwen"):
        if family in lowered:
            return family
    config = _local_config(model_name) or {}
    model_type = str(config.get("model_type", "")).lower()
    for family in ("llama", "qwen"):
        if model_type.startswith(family):
            return family
    raise ValueError(f"no learning-rate formula for {model_name!r}: the LoRA LR formula is "
                     f"calibrated for the Llama and Qwen families only ({sorted(EXPONENTS)}); "
                     "pass a learning rate yourself")


def get_lr(model_name: str, is_lora: bool = True) -> float:
    """Recommended Adam learning rate for (LoRA) fine-tuning `model_name`."""
    exponent = EXPONENTS[model_family(model_name)]
    lr = BASE_LR * (LORA_MULTIPLIER if is_lora else 1.0)
    return lr * (2000 / get_hidden_size(model_name)) ** exponent


# ------------------------------------------------------------------- schedules
# Each returns the multiplier of the base learning rate at `step` (0-based) of `total_steps`.

def constant(step: int, total_steps: int = 0, warmup_steps: int = 0) -> float:
    """1.0, after an optional linear warmup."""
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def linear_decay(step: int, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warmup, then linear from 1.0 at `warmup_steps` to `final` at `total_steps`."""
    _check(total_steps, warmup_steps)
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 + (final - 1.0) * progress


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warmup, then a half cosine from 1.0 down to `final` at `total_steps`."""
    _check(total_steps, warmup_steps)
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1) / warmup: the first step already moves the weights, the last reaches 1.0.
    return (step + 1) / warmup_steps


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                         f"got {total_steps}, {warmup_steps}")
