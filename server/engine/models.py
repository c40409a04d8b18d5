"""Base models: resolve a name to a frozen causal LM with multi-LoRA layers in place.

A base model name is one of:
  * a built-in tiny model (`tiny-qwen3`, `tiny-llama`): random init from a fixed seed;
  * a local directory holding a transformers model (config.json + weights + tokenizer);
  * a Hugging Face hub id already in the local HF cache (never downloaded here).

Frozen; bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from server import tiny

from .lora import MultiLoRALinear, wrap_linear_layers


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class BaseModel:
    """A loaded, frozen base model and everything the engine needs to know about it."""

    name: str
    model: nn.Module  # the transformers causal LM, LoRA layers in place
    tokenizer: Any
    lora_layers: dict[str, MultiLoRALinear]
    device: torch.device
    dtype: torch.dtype
    arch: str
    vocab_size: int
    max_length: int
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def cached_hub_models() -> list[str]:
    """Hub ids of causal LMs already in the local HF cache (no network)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache directory yet, or an unreadable one
        return []
    return sorted(repo.repo_id for repo in info.repos if repo.repo_type == "model")


def available_models() -> list[str]:
    return [*tiny.TINY_MODEL_NAMES, *cached_hub_models()]


def _unknown_model_error(name: str) -> ValueError:
    listed = ", ".join(available_models())
    return ValueError(
        f"unknown base model {name!r}: not a built-in tiny model, not a local model "
        f"directory and not in the local Hugging Face cache. Available: {listed}"
    )


def model_source(name: str) -> tuple[str, dict]:
    """(source, from_pretrained kwargs) that transformers loads `name` from, never over the
    network: a built-in tiny model's directory, a local directory (absolute), or a hub id
    read from the local cache only (`local_files_only`)."""
    if name in tiny.TINY_MODEL_NAMES:
        return str(tiny.tiny_model_dir(name)), {}
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return os.path.abspath(local), {}
    return name, {"local_files_only": True}


def load_base_model(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype(device)
    if name in tiny.TINY_MODEL_NAMES:
        model = tiny.build_tiny_model(name, dtype=dtype, device=str(device))
        tokenizer = tiny.load_tiny_tokenizer(name)
    else:
        source, kwargs = model_source(name)
        if not kwargs:  # a local directory
            if not (Path(source) / "config.json").exists():
                raise ValueError(f"{name!r} is a directory but holds no config.json")
        elif not (name.count("/") == 1 and name in cached_hub_models()):
            raise _unknown_model_error(name)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", **kwargs
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return wrap_base_model(name, model, tokenizer, device, dtype)


def wrap_base_model(name: str, model: nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> BaseModel:
    """Freeze a loaded causal LM and put multi-LoRA layers in place (benchmarks use it
    directly for random-init models built from a config)."""
    model.eval()
    model.requires_grad_(False)
    layers = wrap_linear_layers(model)
    config = model.config
    eos = _eos_token_ids(model, tokenizer)
    return BaseModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        lora_layers=layers,
        device=device,
        dtype=dtype,
        arch=type(model).__name__,
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        max_length=int(getattr(config, "max_position_embeddings", 2048)),
        eos_token_ids=eos,
    )


def _eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a generation by default (tokenizer eos + generation config)."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        candidates.append(gen.eos_token_id)
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's files, so a client can rebuild it without the hub or the server's disk."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
