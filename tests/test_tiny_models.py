"""Tests of the built-in tiny models (server/tiny)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from server import tiny
from server.tiny import build_tokenizers

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = tiny.TINY_MODEL_NAMES
VOCAB = 4096

# Expected special tokens, in id order at the end of the vocabulary, with
# their `special` flag.
ADDED_TOKENS = {
    "tiny-qwen3": [
        ("<|endoftext|>", True),
        ("<|im_start|>", True),
        ("<|im_end|>", True),
        ("<think>", False),
        ("</think>", False),
    ],
    "tiny-llama": [
        ("<|begin_of_text|>", True),
        ("<|end_of_text|>", True),
        ("<|finetune_right_pad_id|>", True),
        ("<|start_header_id|>", True),
        ("<|end_header_id|>", True),
        ("<|eot_id|>", True),
    ],
}
# (bos, eos, pad) of the tokenizer, and the token behind config.bos_token_id.
NAMED_TOKENS = {
    "tiny-qwen3": (None, "<|im_end|>", "<|endoftext|>", "<|endoftext|>"),
    "tiny-llama": ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|begin_of_text|>"),
}
END_OF_TEXT = {"tiny-qwen3": "<|endoftext|>", "tiny-llama": "<|end_of_text|>"}

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "",
    " ",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n\nthree newlines",
    "Café, naïve, façade, déjà vu: répondez s'il vous plaît.",
    "Emoji: 😀👍🏽🎉❤️ 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "中文，日本語のテキスト、한국어, العربية, עברית, Ελληνικά, русский",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2, π ≈ 3.14159, x ≤ y ≥ z, 10 × 3 ÷ 2 ± 1",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "12 + 7 = 19\nreverse: abc -> cba\nkey: apple -> value: 42",
    "control \x00\x01\x07\x1b[0m chars and \u200b zero width \ufeff",
    "".join(chr(i) for i in range(256)),
    "<|im_start|> and <|eot_id|> written by a user <think>x</think>",
]


@lru_cache(maxsize=None)
def tokenizer(name):
    return tiny.load_tiny_tokenizer(name)


@lru_cache(maxsize=None)
def model(name):
    return tiny.build_tiny_model(name)


def read_json(name: str, filename: str) -> dict:
    return json.loads((tiny.tiny_model_dir(name) / filename).read_text(encoding="utf-8"))


def token_id(name: str, token: str) -> int:
    return tokenizer(name).convert_tokens_to_ids(token)


def state_dict_sha256(m: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(m.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- API


def test_names_and_dirs():
    assert NAMES == ("tiny-qwen3", "tiny-llama")
    for name in NAMES:
        d = tiny.tiny_model_dir(name)
        assert d.is_dir()
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file()


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="tiny-qwen3.*tiny-llama"):
        tiny.tiny_model_dir("tiny-gpt")
    with pytest.raises(ValueError, match="available"):
        tiny.build_tiny_model("nope")


def test_import_is_lazy():
    code = "import sys, server.tiny; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


# --------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", NAMES)
def test_vocab_and_special_token_ids(name):
    tok = tokenizer(name)
    assert len(tok) == VOCAB
    added = ADDED_TOKENS[name]
    first = VOCAB - len(added)
    assert tok.vocab_size == first  # the BPE part; the added tokens come after it
    decoder = tok.added_tokens_decoder
    for offset, (content, special) in enumerate(added):
        tid = first + offset
        assert decoder[tid].content == content
        assert decoder[tid].special is special
        # Encodes to that single id, alone and inside text.
        assert tok.encode(content, add_special_tokens=False) == [tid]
        ids = tok.encode(f"a{content}b", add_special_tokens=False)
        assert ids.count(tid) == 1
        assert tok.decode([tid]) == content
    # Every special token is known as one.
    specials = {c for c, special in added if special}
    assert set(tok.all_special_tokens) == specials


@pytest.mark.parametrize("name", NAMES)
def test_named_tokens_match_configs(name):
    tok = tokenizer(name)
    bos, eos, pad, config_bos = NAMED_TOKENS[name]
    assert tok.bos_token == bos
    assert tok.eos_token == eos
    assert tok.pad_token == pad
    assert tok.model_max_length == 2048
    config = read_json(name, "config.json")
    assert config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == tok.eos_token_id == token_id(name, eos)
    assert config["pad_token_id"] == tok.pad_token_id == token_id(name, pad)
    assert config["bos_token_id"] == token_id(name, config_bos)
    if bos is None:
        assert tok.bos_token_id is None
    else:
        assert tok.bos_token_id == config["bos_token_id"]
    gen = read_json(name, "generation_config.json")
    assert gen["eos_token_id"] == [tok.eos_token_id, token_id(name, END_OF_TEXT[name])]
    assert gen["pad_token_id"] == tok.pad_token_id
    m = model(name)
    assert m.config.eos_token_id == tok.eos_token_id
    assert m.config.pad_token_id == tok.pad_token_id
    assert m.generation_config.eos_token_id == gen["eos_token_id"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(name, text):
    tok = tokenizer(name)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # Byte-level: no unknown tokens, ever.
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    if "<|" not in text:
        with_specials = tok(text).input_ids
        assert tok.decode(with_specials, skip_special_tokens=True) == text


def test_round_trip_random_unicode():
    # Random code points (surrogates excluded) from a fixed generator.
    g = torch.Generator().manual_seed(0)
    points = torch.randint(1, 0x10FFFF, (2000,), generator=g).tolist()
    text = "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)
    for name in NAMES:
        tok = tokenizer(name)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_add_special_tokens():
    # Llama 3 prepends <|begin_of_text|>; Qwen adds nothing.
    llama, qwen = tokenizer("tiny-llama"), tokenizer("tiny-qwen3")
    plain = llama.encode("Hello there", add_special_tokens=False)
    assert llama.encode("Hello there") == [llama.bos_token_id, *plain]
    assert llama("a", "b").input_ids == [
        llama.bos_token_id,
        *llama.encode("a", add_special_tokens=False),
        llama.bos_token_id,
        *llama.encode("b", add_special_tokens=False),
    ]
    assert qwen.encode("Hello there") == qwen.encode("Hello there", add_special_tokens=False)


def test_corpus_words_are_compact():
    # Sanity check of the BPE training: common English words and the chat
    # roles are single tokens.
    for name in NAMES:
        tok = tokenizer(name)
        for word in ("The", " the", " and", " water", "user", "assistant", "system", " reverse"):
            assert len(tok.encode(word, add_special_tokens=False)) == 1, (name, word)


# ---------------------------------------------------------------- chat templates

SYSTEM_USER_ASSISTANT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4"},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"},
    {"role": "user", "content": "Reverse abc."},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Thanks."},
]


def chat(name, messages, **kwargs):
    return tokenizer(name).apply_chat_template(messages, tokenize=False, **kwargs)


def test_qwen3_chat_template():
    name = "tiny-qwen3"
    assert chat(name, SYSTEM_USER_ASSISTANT) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        # The final assistant turn always gets a (here empty) think block.
        "<|im_start|>assistant\n<think>\n\n</think>\n\n2 + 2 = 4<|im_end|>\n"
    )
    history = (
        "<|im_start|>user\nHi!<|im_end|>\n"
        # Reasoning of turns before the last user message is dropped.
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nReverse abc.<|im_end|>\n"
        "<|im_start|>assistant\ncba<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
    )
    assert chat(name, MULTI_TURN) == history
    assert chat(name, MULTI_TURN, add_generation_prompt=True) == history + "<|im_start|>assistant\n"
    assert chat(name, MULTI_TURN, add_generation_prompt=True, enable_thinking=True) == (
        history + "<|im_start|>assistant\n"
    )
    assert chat(name, MULTI_TURN, add_generation_prompt=True, enable_thinking=False) == (
        history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Reasoning after the last user message is kept, from the content or from
    # reasoning_content; the last turn's think block is written even if empty.
    agentic = [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nfirst"},
        {"role": "assistant", "content": "second", "reasoning_content": "step two"},
        {"role": "assistant", "content": "plain"},
        {"role": "assistant", "content": "last"},
    ]
    assert chat(name, agentic) == (
        "<|im_start|>user\nGo.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nstep one\n</think>\n\nfirst<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nstep two\n</think>\n\nsecond<|im_end|>\n"
        "<|im_start|>assistant\nplain<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nlast<|im_end|>\n"
    )
    assert chat(name, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]) == (
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<|im_end|>\n"
    )
    # Content is not trimmed; None content renders as empty.
    assert chat(name, [{"role": "user", "content": " x\n"}, {"role": "assistant", "content": None}]) == (
        "<|im_start|>user\n x\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<|im_end|>\n"
    )


def test_qwen3_prompt_is_prefix_of_conversation():
    # With enable_thinking=False the generation prompt is exactly the start of
    # the rendered answer turn: what training on chats relies on.
    full = chat("tiny-qwen3", SYSTEM_USER_ASSISTANT)
    prompt = chat("tiny-qwen3", SYSTEM_USER_ASSISTANT[:-1], add_generation_prompt=True, enable_thinking=False)
    assert full == prompt + "2 + 2 = 4<|im_end|>\n"


def test_llama3_chat_template():
    name = "tiny-llama"
    assert chat(name, SYSTEM_USER_ASSISTANT) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 2 = 4<|eot_id|>"
    )
    history = (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        # No reasoning handling in Llama 3: the content is written as is.
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nReverse abc.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ncba<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThanks.<|eot_id|>"
    )
    assert chat(name, MULTI_TURN) == history
    assert chat(name, MULTI_TURN, add_generation_prompt=True) == (
        history + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Content is trimmed; empty content stays empty.
    assert chat(name, [{"role": "user", "content": "  x \n"}, {"role": "assistant", "content": ""}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
    )
    full = chat(name, SYSTEM_USER_ASSISTANT)
    prompt = chat(name, SYSTEM_USER_ASSISTANT[:-1], add_generation_prompt=True)
    assert full == prompt + "2 + 2 = 4<|eot_id|>"


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_tokenized(name):
    tok = tokenizer(name)
    text = chat(name, MULTI_TURN, add_generation_prompt=True)
    ids = tok.apply_chat_template(MULTI_TURN, add_generation_prompt=True, return_dict=False)
    # The template writes bos itself; tokenizing must not add a second one.
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    start = "<|im_start|>" if name == "tiny-qwen3" else "<|start_header_id|>"
    assert ids.count(token_id(name, start)) == 6
    if name == "tiny-llama":
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# ------------------------------------------------------------------------- model


@pytest.mark.parametrize("name", NAMES)
def test_model_architecture(name):
    m = model(name)
    expected = {"tiny-qwen3": "Qwen3ForCausalLM", "tiny-llama": "LlamaForCausalLM"}[name]
    assert type(m).__name__ == expected
    assert not m.training
    assert m.config._attn_implementation == "sdpa"
    assert m.dtype == torch.float32
    n_params = sum(p.numel() for p in m.parameters())
    assert 2_000_000 <= n_params <= 10_000_000
    tied = m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert tied is (name == "tiny-qwen3")
    assert m.get_input_embeddings().weight.shape == (VOCAB, 256)
    rope = m.config.rope_parameters["rope_theta"]
    assert rope == {"tiny-qwen3": 1e6, "tiny-llama": 5e5}[name]


@pytest.mark.parametrize("name", NAMES)
def test_forward(name):
    tok = tokenizer(name)
    ids = tok("The water cycle is always moving.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(name)(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB)
    assert torch.isfinite(logits).all()
    # Random init: close to uniform but not degenerate.
    assert logits.std() > 0


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic(name):
    state = torch.random.get_rng_state()
    again = tiny.build_tiny_model(name)
    assert torch.equal(state, torch.random.get_rng_state()), "global RNG state must be untouched"
    a, b = model(name).state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    other_seed = tiny.build_tiny_model(name, seed=tiny.tiny_model_seed(name) + 100)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], other_seed.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_models_have_different_weights():
    q = model("tiny-qwen3").state_dict()["model.layers.0.mlp.up_proj.weight"]
    l = model("tiny-llama").state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert q.shape == l.shape and not torch.equal(q, l)


def test_build_is_deterministic_across_processes():
    code = (
        "import hashlib, torch, server.tiny as t\n"
        "for n in t.TINY_MODEL_NAMES:\n"
        "    h = hashlib.sha256()\n"
        "    for k, v in sorted(t.build_tiny_model(n).state_dict().items()):\n"
        "        h.update(k.encode()); h.update(v.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "    print(h.hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [state_dict_sha256(model(name)) for name in NAMES]


def test_low_precision_build():
    m = tiny.build_tiny_model("tiny-llama", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    ref = model("tiny-llama").state_dict()["lm_head.weight"]
    assert torch.equal(m.state_dict()["lm_head.weight"], ref.to(torch.bfloat16))


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny.save_tiny_model(name, tmp_path / name)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    tok = tokenizer(name)

    text = "Once upon a time, on a rocky point 🌊, there stood a lighthouse."
    ids = tok(text, return_tensors="pt").input_ids
    assert loaded_tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert loaded_tok.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True) == chat(
        name, MULTI_TURN, add_generation_prompt=True
    )
    assert (loaded_tok.bos_token_id, loaded_tok.eos_token_id, loaded_tok.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert loaded.generation_config.eos_token_id == model(name).generation_config.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(name)(ids).logits, rtol=0, atol=1e-6)


# --------------------------------------------------------- committed build output


def test_committed_files_match_a_fresh_build(tmp_path):
    paths = build_tokenizers.build(tmp_path)
    assert len(paths) == 8
    for path in paths:
        rel = path.relative_to(tmp_path)
        committed = tiny.TINY_DIR / rel
        assert json.loads(committed.read_text(encoding="utf-8")) == json.loads(
            path.read_text(encoding="utf-8")
        ), f"{rel} is stale: run python -m server.tiny.build_tokenizers"


def test_build_script_main(tmp_path):
    assert build_tokenizers.main(["--out-dir", str(tmp_path)]) == 0
    for name in NAMES:
        assert (tmp_path / name / "tokenizer.json").read_bytes() == (
            tiny.tiny_model_dir(name) / "tokenizer.json"
        ).read_bytes()
