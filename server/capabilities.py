"""What get_server_capabilities reports (both frontends): the base models with their cards
(parameters, context length, family, tokenizer), the losses, the maximum rank and the cycle
mode. A card is read from the model's config on the meta device, so nothing is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Capabilities:
    """The get_server_capabilities answer; model cards are cached once read."""

    def __init__(self, engine, max_rank: int, cycle_ms: int):
        from workbench.losses import LOSS_NAMES

        from .engine.models import available_models

        self.engine = engine
        self.max_rank = max_rank
        self.cycle_mode = "continuous" if cycle_ms == 0 else f"clock {cycle_ms} ms"
        self.losses = list(LOSS_NAMES)
        self.listed = available_models()
        self._cards: dict[str, dict] = {}

    @property
    def model_names(self) -> list[str]:
        # Models loaded from local directories join the built-in and cached ones.
        return [*self.listed, *(n for n in list(self.engine.bases) if n not in self.listed)]

    def response(self) -> dict:
        return {
            "supported_models": [self.card(name) for name in self.model_names],
            "losses": self.losses,
            "max_lora_rank": self.max_rank,
            "cycle_mode": self.cycle_mode,
        }

    def card(self, name: str) -> dict:
        if name not in self._cards:
            try:
                self._cards[name] = {"model_name": name, **_model_card(name)}
            except Exception as exc:  # an unreadable cached model is listed, not fatal
                print(f"[workbench-server] no model card for {name}: {exc}", file=sys.stderr)
                return {"model_name": name}
        return self._cards[name]


def _model_card(name: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .engine.models import gguf_file, model_config_source

    # A GGUF model's config without converting it (read from the file once, then cached).
    source, kwargs = model_config_source(name)
    config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config)
    tokenizer_class = None
    tokenizer_config = Path(source) / "tokenizer_config.json"
    if tokenizer_config.exists() and gguf_file(name) is None:  # a GGUF's tokenizer: its own name
        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "context_length": int(getattr(config, "max_position_embeddings", 0)) or None,
        "family": config.model_type,
        "tokenizer": tokenizer_class or name,
    }
