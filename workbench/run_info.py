"""The facts of a training run worth seeing before it starts: base model, LoRA rank,
trainable parameters, server. Recipes print them as a start banner; `%tinker watch` shows
them above its figure. One function gathers them so both say the same thing.

>>> print(banner("sft", {"base model": "tiny-qwen3", "LoRA rank": "4"}))
── sft ───────────────────────────
base model  tiny-qwen3
LoRA rank   4
"""

from __future__ import annotations

from typing import Any, Optional


def human_count(n: Optional[int]) -> str:
    """1234567 -> '1,234,567 (1.23M)'; None -> 'unknown'.

    >>> human_count(1234567), human_count(950), human_count(None)
    ('1,234,567 (1.23M)', '950', 'unknown')
    """
    if n is None:
        return "unknown"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n:,} ({n / size:.3g}{unit})"
    return f"{n:,}"


def server_text(service: Any) -> str:
    """A ServiceClient's URL, marked when it is the embedded server this process started."""
    if service is None:
        return "unknown"
    url = getattr(service, "base_url", None) or "unknown"
    return f"{url} (embedded)" if getattr(service, "local_server", None) is not None else url


def run_facts(training_client: Any, **extra: Any) -> dict[str, str]:
    """The run's facts as display strings, in display order; `extra` (batch size, steps,
    log dir, ...) are appended under their names, underscores as spaces. Trainable
    parameters are the server's count at creation (LoRA A and B entries), when it sent one."""
    facts = {
        "base model": str(getattr(training_client, "base_model", "unknown")),
        "LoRA rank": str(getattr(training_client, "lora_rank", "unknown")),
        "trainable": human_count(getattr(training_client, "trainable_parameters", None)),
        "server": server_text(getattr(training_client, "_service", None)),
    }
    facts.update({name.replace("_", " "): str(value) for name, value in extra.items() if value is not None})
    return facts


def banner(title: str, facts: dict[str, str]) -> str:
    """One short block: a title rule, then `name  value` lines."""
    width = max(len(name) for name in facts) if facts else 0
    lines = [f"── {title} " + "─" * max(3, 30 - len(title))]
    lines += [f"{name.ljust(width)}  {value}" for name, value in facts.items()]
    return "\n".join(lines)
