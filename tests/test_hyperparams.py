"""get_lr's LoRA formula, hidden sizes, and learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from workbench.hyperparams import (
    constant, cosine_with_warmup, get_hidden_size, get_lr, linear_decay, model_family,
)


def test_lr_formula_by_family():
    assert get_lr("Qwen/Qwen3-8B") == pytest.approx(5e-5 * 10 * (2000 / 4096) ** 0.0775, rel=1e-12)
    assert get_lr("meta-llama/Llama-3.1-8B") == pytest.approx(5e-5 * 10 * (2000 / 4096) ** 0.781, rel=1e-12)
    assert get_lr("tiny-qwen3") == pytest.approx(5e-4 * (2000 / 256) ** 0.0775, rel=1e-12)
    assert get_lr("tiny-llama") == pytest.approx(5e-4 * (2000 / 256) ** 0.781, rel=1e-12)
    assert get_lr("Qwen/Qwen3-8B", is_lora=False) == pytest.approx(get_lr("Qwen/Qwen3-8B") / 10)
    # Larger models of a family get smaller rates.
    assert get_lr("Qwen/Qwen3-0.6B") > get_lr("Qwen/Qwen3-32B")


def test_hidden_size_from_table_and_config(tmp_path):
    assert get_hidden_size("Qwen/Qwen3-0.6B") == 1024
    assert get_hidden_size("meta-llama/Llama-3.2-3B") == 3072
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 640}')
    assert get_hidden_size(str(model_dir)) == 640
    assert model_family(str(model_dir)) == "qwen"
    assert get_lr(str(model_dir)) == pytest.approx(5e-4 * (2000 / 640) ** 0.0775)


def test_tiny_table_matches_shipped_configs():
    import json

    from server.tiny import tiny_model_dir

    for name in ("tiny-qwen3", "tiny-llama"):
        config = json.loads((tiny_model_dir(name) / "config.json").read_text())
        assert get_hidden_size(name) == config["hidden_size"]
        assert get_hidden_size(str(tiny_model_dir(name))) == config["hidden_size"]


def test_unknown_models_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Llama and Qwen families only"):
        get_lr("mistralai/Mistral-7B-v0.1")
    with pytest.raises(ValueError, match="hidden size of 'Qwen/Qwen3-999B' unknown"):
        get_lr("Qwen/Qwen3-999B")
    (tmp_path / "config.json").write_text('{"model_type": "gemma"}')
    with pytest.raises(ValueError, match="Llama and Qwen"):
        get_lr(str(tmp_path))


def test_schedules():
    assert [constant(s) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [constant(s, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert linear_decay(0, 10) == 1.0 and linear_decay(5, 10) == 0.5 and linear_decay(10, 10) == 0.0
    assert linear_decay(99, 10, final=0.1) == pytest.approx(0.1)
    assert [linear_decay(s, 12, warmup_steps=2) for s in (0, 1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert cosine_with_warmup(0, 100) == 1.0
    assert cosine_with_warmup(50, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100) == pytest.approx(0.0)
    assert cosine_with_warmup(100, 100, final=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_with_warmup(10, 100, warmup_steps=10) == 1.0
    values = [cosine_with_warmup(s, 50, warmup_steps=5) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing after warmup
    assert cosine_with_warmup(30, 50, warmup_steps=5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 45)))
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(0, 10, warmup_steps=11)
