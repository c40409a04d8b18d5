"""Built-in tiny causal LMs: ``tiny-qwen3`` and ``tiny-llama``.

They are the real transformers Qwen3 and Llama architectures at a few million
parameters, so that everything that runs on a real checkpoint (LoRA wrapping,
training, sampling, chat templates, saving and loading) can be exercised in
seconds on a CPU, without a model hub.

No weights are committed. Each model directory next to this file holds only
``config.json``, ``generation_config.json`` and a byte-level BPE tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``) that
``python -m server.tiny.build_tokenizers`` trains from ``corpus.txt`` and
regenerates bit for bit. The weights are a random initialisation drawn from a
fixed seed, so a given model name always means the same network.

This module imports neither torch nor transformers at import time: listing the
model names must stay cheap for callers that never build a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "TINY_DIR",
    "TINY_MODEL_NAMES",
    "TINY_SEED",
    "build_tiny_model",
    "load_tiny_tokenizer",
    "save_tiny_model",
    "tiny_model_dir",
    "tiny_model_seed",
]

#: Directory holding one sub-directory per tiny model.
TINY_DIR: Path = Path(__file__).resolve().parent

#: Names of the built-in models (also their directory names under TINY_DIR).
TINY_MODEL_NAMES: tuple[str, ...] = ("tiny-qwen3", "tiny-llama")

#: Base seed of the weight initialisation. Model ``TINY_MODEL_NAMES[i]`` is
#: initialised from ``TINY_SEED + i`` (see ``tiny_model_seed``): with a single
#: shared seed the two models would get identical attention and MLP matrices
#: (same shapes, same draw order), which could hide a mix-up between them.
TINY_SEED: int = 1234


def tiny_model_dir(name: str) -> Path:
    """Directory with the config and tokenizer files of the tiny model ``name``.

    Raises ValueError, listing the available names, for an unknown name.
    """
    if name not in TINY_MODEL_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(TINY_MODEL_NAMES)}")
    return TINY_DIR / name


def tiny_model_seed(name: str) -> int:
    """The default initialisation seed of the tiny model ``name``."""
    tiny_model_dir(name)  # validates the name
    return TINY_SEED + TINY_MODEL_NAMES.index(name)


def build_tiny_model(
    name: str,
    dtype: "torch.dtype | None" = None,
    device: "str | torch.device" = "cpu",
    seed: int | None = None,
) -> "PreTrainedModel":
    """Build the tiny model ``name`` with its deterministic random weights.

    The weights are a function of ``seed`` alone: two builds give bitwise
    identical state dicts, in the same process or in a fresh one. The global
    torch RNG state is left untouched. The model is always initialised in
    float32 on the CPU and only then moved and cast, so the initial values do
    not depend on ``device`` (CUDA kernels would draw different numbers) and a
    low-precision ``dtype`` is a rounding of the float32 weights.

    Args:
        name: one of ``TINY_MODEL_NAMES``.
        dtype: parameter dtype (default ``torch.float32``).
        device: where the returned model lives.
        seed: initialisation seed (default ``tiny_model_seed(name)``).

    Returns:
        The ``transformers`` causal LM (``Qwen3ForCausalLM`` or
        ``LlamaForCausalLM``), with SDPA attention, in eval mode.
    """
    model_dir = tiny_model_dir(name)  # validate the name before the slow imports

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if seed is None:
        seed = tiny_model_seed(name)
    config = AutoConfig.from_pretrained(model_dir)
    # fork_rng restores the CPU generator afterwards; devices=[] because the
    # init never touches a CUDA generator (and forking them would initialise
    # CUDA for nothing).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config runs the model's _init_weights on every module, drawing
        # from the (just seeded) default CPU generator.
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    # Stop on both end tokens (chat and plain text), as the real instruct
    # models do; from_config would only take the single config.eos_token_id.
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    model.to(device=device, dtype=dtype)
    # Keep the config truthful, so save_pretrained records the real dtype.
    model.config.dtype = dtype
    model.eval()
    return model


def load_tiny_tokenizer(name: str) -> "PreTrainedTokenizerBase":
    """The tokenizer of the tiny model ``name`` (``AutoTokenizer``, offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir(name))


def save_tiny_model(name: str, dest_dir: "str | Path", **build_kwargs: Any) -> Path:
    """Write the tiny model ``name`` as a complete transformers model directory.

    The directory (config, generation config, safetensors weights and
    tokenizer) loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``, so code paths for local model
    directories can be tested without a real checkpoint. ``build_kwargs`` go
    to ``build_tiny_model`` (e.g. ``seed``). Returns the directory.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(name, **build_kwargs)
    model.save_pretrained(dest)
    load_tiny_tokenizer(name).save_pretrained(dest)
    return dest
