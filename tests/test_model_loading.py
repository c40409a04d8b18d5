"""Base models from a local Hugging Face directory: the real loading path (from_pretrained,
offline), tested on a model saved to a temp directory, since nothing is downloaded here."""

from __future__ import annotations

import os

import pytest
import torch

from server.capabilities import _model_card
from server.engine.models import load_base_model, model_source
from server.tinker_http import tokenizer_id
from server.tiny import build_tiny_model, load_tiny_tokenizer, tiny_model_dir

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """tiny-llama saved as an ordinary transformers model directory (weights + tokenizer)."""
    path = tmp_path_factory.mktemp("models") / "my-llama"
    build_tiny_model("tiny-llama").save_pretrained(path)
    load_tiny_tokenizer("tiny-llama").save_pretrained(path)
    return path


def test_a_local_directory_loads_the_model_it_holds(saved_dir):
    cpu = torch.device("cpu")
    loaded, reference = load_base_model(str(saved_dir), cpu), load_base_model("tiny-llama", cpu)
    assert loaded.name == str(saved_dir) and loaded.dtype == torch.float32
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference.model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert loaded.tokenizer.encode("hello there") == reference.tokenizer.encode("hello there")
    assert set(loaded.lora_layers) == set(reference.lora_layers)  # every projection is adaptable


def test_sources_are_offline_and_named_the_same_everywhere(saved_dir, monkeypatch):
    monkeypatch.chdir(saved_dir.parent)
    assert model_source("my-llama") == (str(saved_dir), {})  # relative: made absolute
    assert model_source("tiny-qwen3") == (str(tiny_model_dir("tiny-qwen3")), {})
    assert model_source("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", {"local_files_only": True})
    assert tokenizer_id("my-llama") == str(saved_dir)  # what the Tinker SDK's AutoTokenizer loads
    card = _model_card(str(saved_dir))
    assert card["family"] == "llama" and card["parameters"] == sum(
        p.numel() for p in build_tiny_model("tiny-llama").parameters())


def test_bad_local_names_get_clear_errors(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no config.json"):
        load_base_model(str(empty), torch.device("cpu"))
    missing = "nobody/" + os.urandom(4).hex()  # hub-shaped, in no cache: never downloaded
    with pytest.raises(ValueError, match="not in the local Hugging Face cache. Available: .*tiny-qwen3"):
        load_base_model(missing, torch.device("cpu"))
