"""Regenerate the committed files of the built-in tiny models.

Run it as ``python -m server.tiny.build_tokenizers`` (optionally with
``--out-dir DIR`` to write somewhere other than ``server/tiny/``).

For each model (``tiny-qwen3`` and ``tiny-llama``) it writes, into
``<out-dir>/<model>/``:

* ``tokenizer.json``: a byte-level BPE with a vocabulary of exactly
  ``VOCAB_SIZE`` ids, trained here with the ``tokenizers`` library, plus that
  family's special tokens appended at the end of the vocabulary (the way the
  real Qwen3 and Llama 3 vocabularies put them after the BPE pieces);
* ``tokenizer_config.json``: what ``transformers.AutoTokenizer`` needs
  (class, bos/eos/pad, ``model_max_length``, the chat template);
* ``config.json`` and ``generation_config.json``: the model architecture.

The output is a pure function of ``corpus.txt`` and this file (and of the
``tokenizers``/``transformers`` versions): no global RNG, no timestamps, no
dependence on dict or set iteration order of unsorted data. Running the script
twice gives byte-identical files; ``tests/test_tiny_models.py`` checks that
the committed files match a fresh build.

Training text: the shipped English ``corpus.txt``, deterministic synthetic
tasks (arithmetic, string reversal, key/value recall, ...) of the kind the tiny
models get fine-tuned on in tests, and chat conversations written in the
family's own chat format so that role names and the template's newlines
become single tokens. Special tokens are cut out of the training text before
it reaches the trainer: they are matched as added tokens before BPE runs, so
spending merges on their pieces would waste vocabulary.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent
CORPUS_PATH = TINY_DIR / "corpus.txt"

#: Total vocabulary size, special tokens included (a multiple of 64, so the
#: embedding matrices stay friendly to tensor cores).
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 2048
#: Seed of the synthetic-text generator (not of the model weights).
DATA_SEED = 20240601


# ---------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------

# The Qwen3 template with the tool parts removed (no ``tools`` system block, no
# ``tool_calls``, no ``<tool_response>`` wrapping). The rest follows the real
# Qwen3 template: reasoning is taken from ``reasoning_content`` or from a
# ``<think>...</think>`` prefix of the content; it is kept only for assistant
# turns after the last user message (the current agentic turn), and dropped
# from earlier history. The final assistant turn of that span always gets a
# (possibly empty) think block. ``enable_thinking=False`` pre-fills an empty
# think block after the generation prompt. Any role other than "assistant" is
# rendered verbatim as ``<|im_start|>{role}\n{content}<|im_end|>\n``.
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(searching=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.searching and message.role == 'user' %}\n"
    "        {%- set ns.searching = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if message.role == 'assistant' %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

# The plain Llama 3 (3.0) template: bos once, then a header and the trimmed
# content of every message. Unlike 3.1 there is no "Cutting Knowledge Date"
# system block. bos is written unconditionally (3.0 writes it with the first
# message; transformers refuses empty conversations, so that is the same).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content | trim %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + content + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class AddedTok:
    content: str
    special: bool = True


@dataclass(frozen=True)
class Family:
    """Everything that differs between the two tiny models."""

    model_name: str
    # In id order: they get the ids VOCAB_SIZE - len(added_tokens) ... VOCAB_SIZE - 1.
    added_tokens: tuple[AddedTok, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str
    # The plain-text end token, listed in generation_config next to eos_token.
    end_of_text_token: str
    chat_template: str
    prepend_bos: bool
    architecture: str


QWEN3 = Family(
    model_name="tiny-qwen3",
    # Same relative order as the real Qwen3 ids (151643, 151644, 151645, ...,
    # 151667, 151668). <think>/</think> are added tokens but not special.
    added_tokens=(
        AddedTok("<|endoftext|>"),
        AddedTok("<|im_start|>"),
        AddedTok("<|im_end|>"),
        AddedTok("<think>", special=False),
        AddedTok("</think>", special=False),
    ),
    bos_token=None,  # real Qwen3 tokenizers have no bos token and prepend nothing
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    end_of_text_token="<|endoftext|>",
    chat_template=QWEN3_CHAT_TEMPLATE,
    prepend_bos=False,
    architecture="Qwen3ForCausalLM",
)

LLAMA3 = Family(
    model_name="tiny-llama",
    # Same relative order as the real Llama 3 ids (128000, 128001, 128004,
    # 128006, 128007, 128009); the reserved tokens in between are left out.
    added_tokens=(
        AddedTok("<|begin_of_text|>"),
        AddedTok("<|end_of_text|>"),
        AddedTok("<|finetune_right_pad_id|>"),
        AddedTok("<|start_header_id|>"),
        AddedTok("<|end_header_id|>"),
        AddedTok("<|eot_id|>"),
    ),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    end_of_text_token="<|end_of_text|>",
    chat_template=LLAMA3_CHAT_TEMPLATE,
    prepend_bos=True,
    architecture="LlamaForCausalLM",
)

FAMILIES: tuple[Family, ...] = (QWEN3, LLAMA3)

# Architecture shared by both models (about 4-5 M parameters).
_ARCH = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=MODEL_MAX_LENGTH,
)


# ---------------------------------------------------------------------------
# Deterministic synthetic text
# ---------------------------------------------------------------------------


class _Rng:
    """SplitMix64: tiny, and unlike ``random.Random`` its output is fixed by
    this file alone, so the corpus cannot drift with the Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform-ish integer in [lo, hi] (modulo bias is irrelevant here)."""
        return lo + self.next_u64() % (hi - lo + 1)

    def choice(self, seq):
        return seq[self.next_u64() % len(seq)]

    def sample(self, seq, k: int) -> list:
        pool = list(seq)
        out = []
        for _ in range(min(k, len(pool))):
            out.append(pool.pop(self.next_u64() % len(pool)))
        return out


_LETTERS = "abcdefghijklmnopqrstuvwxyz"

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly and accurately.",
    "You are a patient tutor who explains things step by step.",
    "You are a concise assistant. Reply with the answer only.",
    "You are a friendly assistant that helps with everyday questions.",
)


def read_corpus() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


def corpus_sections(corpus: str) -> list[tuple[str, list[str]]]:
    """Split the corpus into ``(title, paragraphs)`` at its ``== Title ==`` lines."""
    parts = re.split(r"^== (.+) ==$", corpus, flags=re.M)
    # parts = [preamble, title1, body1, title2, body2, ...]
    return [
        (title.strip(), [p.strip() for p in body.strip().split("\n\n") if p.strip()])
        for title, body in zip(parts[1::2], parts[2::2])
    ]


def corpus_words(corpus: str) -> list[str]:
    """Distinct lowercase ASCII words of 3-9 letters, sorted (so the order is fixed)."""
    return sorted({w for w in re.findall(r"[a-z]+", corpus.lower()) if 3 <= len(w) <= 9})


def synthetic_tasks(rng: _Rng, words: list[str], n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of small algorithmic tasks."""
    tasks: list[tuple[str, str]] = []
    for i in range(n):
        kind = i % 10
        if kind == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            tasks.append((f"{a} + {b} =", f" {a + b}"))
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            tasks.append((f"{a} - {b} =", f" {a - b}"))
        elif kind == 2:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            tasks.append((f"{a} * {b} =", f" {a * b}"))
        elif kind == 3:
            w = rng.choice(words) if rng.randint(0, 1) else "".join(
                rng.choice(_LETTERS) for _ in range(rng.randint(3, 8))
            )
            tasks.append((f"reverse: {w} ->", f" {w[::-1]}"))
        elif kind == 4:
            keys = rng.sample(words, 4)
            pairs = [(k, rng.randint(0, 99)) for k in keys]
            facts = "; ".join(f"{k} = {v}" for k, v in pairs)
            k, v = rng.choice(pairs)
            tasks.append((f"memory: {facts}. recall {k} ->", f" {v}"))
        elif kind == 5:
            w = rng.choice(words)
            tasks.append((f"uppercase: {w} ->", f" {w.upper()}"))
        elif kind == 6:
            nums = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
            tasks.append(
                (f"sort: {' '.join(map(str, nums))} ->", f" {' '.join(map(str, sorted(nums)))}")
            )
        elif kind == 7:
            w = rng.choice(words)
            tasks.append((f"length of {w} =", f" {len(w)}"))
        elif kind == 8:
            ws = rng.sample(words, 3)
            tasks.append((f"copy: {' '.join(ws)} ->", f" {' '.join(ws)}"))
        else:
            key = rng.choice(words)
            val = rng.choice(words)
            tasks.append((f"key: {key} -> value:", f" {val}"))
    return tasks


def task_question(prompt: str) -> str:
    """Turn a task prompt into a question a user might type."""
    if prompt.endswith(" ="):
        return f"What is {prompt[:-2]}?"
    return f"Please solve this: {prompt}"


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    reasoning: str = ""


def conversations(rng: _Rng, corpus: str, words: list[str]) -> list[list[Turn]]:
    """Chat conversations mixing corpus knowledge and synthetic tasks."""
    convs: list[list[Turn]] = []
    for title, paragraphs in corpus_sections(corpus):
        # One "tell me about" exchange per corpus section, sometimes two turns.
        conv = []
        if rng.randint(0, 2):
            conv.append(Turn("system", rng.choice(SYSTEM_PROMPTS)))
        conv.append(Turn("user", f"Can you tell me about {title.lower()}?"))
        conv.append(
            Turn(
                "assistant",
                paragraphs[0],
                reasoning=f"The user asks about {title.lower()}. I will give a short explanation.",
            )
        )
        if len(paragraphs) > 1 and rng.randint(0, 1):
            conv.append(Turn("user", "Thanks! Can you tell me more?"))
            conv.append(Turn("assistant", paragraphs[1]))
        convs.append(conv)
    for prompt, answer in synthetic_tasks(rng, words, 240):
        conv = []
        if rng.randint(0, 1):
            conv.append(Turn("system", rng.choice(SYSTEM_PROMPTS)))
        conv.append(Turn("user", task_question(prompt)))
        conv.append(
            Turn(
                "assistant",
                f"{prompt}{answer}",
                reasoning=f"This is a small task. The answer is{answer}.",
            )
        )
        convs.append(conv)
    return convs


def render_qwen3(conv: list[Turn]) -> str:
    """ChatML as the Qwen3 template writes it (thinking shown on the final turn)."""
    out = []
    for i, t in enumerate(conv):
        if t.role == "assistant" and i == len(conv) - 1:
            body = f"<think>\n{t.reasoning}\n</think>\n\n{t.content}"
        else:
            body = t.content
        out.append(f"<|im_start|>{t.role}\n{body}<|im_end|>\n")
    return "".join(out) + "<|endoftext|>"


def render_llama3(conv: list[Turn]) -> str:
    out = ["<|begin_of_text|>"]
    for t in conv:
        out.append(f"<|start_header_id|>{t.role}<|end_header_id|>\n\n{t.content.strip()}<|eot_id|>")
    return "".join(out) + "<|end_of_text|>"


def training_texts(family: Family) -> list[str]:
    """All training documents for one family, special tokens already cut out."""
    corpus = read_corpus()
    words = corpus_words(corpus)
    # The same seed for both families: they share the plain text and the tasks
    # and differ only in how the conversations are formatted.
    rng = _Rng(DATA_SEED)
    docs: list[str] = [p for _, ps in corpus_sections(corpus) for p in ps]
    docs += [corpus.split("\n== ", 1)[0]]  # the preamble before the first section
    docs += [prompt + answer for prompt, answer in synthetic_tasks(rng, words, 1200)]
    render = render_qwen3 if family is QWEN3 else render_llama3
    docs += [render(conv) for conv in conversations(rng, corpus, words)]
    splitter = re.compile("|".join(re.escape(t.content) for t in family.added_tokens))
    return [piece for doc in docs for piece in splitter.split(doc) if piece]


# ---------------------------------------------------------------------------
# Building the files
# ---------------------------------------------------------------------------


def train_tokenizer(family: Family):
    """Train the byte-level BPE of one family and return a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    n_bpe = VOCAB_SIZE - len(family.added_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols, so any byte sequence can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    texts = training_texts(family)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tokenizer.get_vocab_size() != n_bpe:
        raise RuntimeError(
            f"{family.model_name}: BPE training produced {tokenizer.get_vocab_size()} tokens, "
            f"expected {n_bpe}; the corpus is too small for the requested vocabulary"
        )
    # Added one at a time so each gets the next id in the declared order.
    for tok in family.added_tokens:
        added = AddedToken(tok.content, special=tok.special, normalized=False)
        if tok.special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"{family.model_name}: vocab size {tokenizer.get_vocab_size()} != {VOCAB_SIZE}")

    byte_level = processors.ByteLevel(trim_offsets=False)
    if family.prepend_bos:
        bos = family.bos_token
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos} $A",
                    pair=f"{bos} $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, bos_id)],
                ),
            ]
        )
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def tokenizer_config(family: Family) -> dict:
    return {
        "add_prefix_space": False,
        "bos_token": family.bos_token,
        "chat_template": family.chat_template,
        # Off so that decode(encode(text)) == text for every text.
        "clean_up_tokenization_spaces": False,
        "eos_token": family.eos_token,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": family.pad_token,
        # The special tokens that have no named role, so that
        # ``all_special_tokens`` lists every special token (the transformers 4
        # key; transformers 5 reads it as ``extra_special_tokens``).
        "additional_special_tokens": [
            t.content
            for t in family.added_tokens
            if t.special and t.content not in (family.bos_token, family.eos_token, family.pad_token)
        ],
        # The generic class loads tokenizer.json as is; the model-specific
        # classes (Qwen2Tokenizer, LlamaTokenizer) rebuild the pipeline with
        # their own pre-tokenizers in transformers 5.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def model_config(family: Family, token_to_id):
    """The ``transformers`` config of one model."""
    from transformers import LlamaConfig, Qwen3Config

    eos_id = token_to_id(family.eos_token)
    pad_id = token_to_id(family.pad_token)
    if family is QWEN3:
        # As in real Qwen3 configs, bos_token_id is <|endoftext|> even though
        # the tokenizer never prepends it.
        return Qwen3Config(
            vocab_size=VOCAB_SIZE,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
            bos_token_id=token_to_id(family.end_of_text_token),
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            dtype="float32",
            **_ARCH,
        )
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=False,
        rope_theta=500_000.0,
        bos_token_id=token_to_id(family.bos_token),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        **_ARCH,
    )


def generation_config(family: Family, token_to_id) -> dict:
    # Stop on the chat end token and on the plain-text end token, like the
    # real instruct models' generation_config.json.
    bos = family.bos_token or family.end_of_text_token
    return {
        "bos_token_id": token_to_id(bos),
        "eos_token_id": [token_to_id(family.eos_token), token_to_id(family.end_of_text_token)],
        "pad_token_id": token_to_id(family.pad_token),
    }


def _dump_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build_family(family: Family, out_root: Path) -> list[Path]:
    """Write the four files of one model into ``out_root / family.model_name``."""
    out_dir = Path(out_root) / family.model_name
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(family)

    def token_to_id(token: str) -> int:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    paths = [out_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")]
    paths[0].write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _dump_json(tokenizer_config(family), paths[1])
    config = model_config(family, token_to_id)
    config.architectures = [family.architecture]
    # The diff dict leaves out the generic PreTrainedConfig defaults
    # (id2label, return_dict, ...), like save_pretrained does.
    config = config.to_diff_dict()
    # Kept out so the committed file does not churn with every transformers release.
    config.pop("transformers_version", None)
    _dump_json(config, paths[2])
    _dump_json(generation_config(family, token_to_id), paths[3])
    return paths


def build(out_root: Path = TINY_DIR) -> list[Path]:
    """Build both models' files under ``out_root``; returns the written paths."""
    return [p for family in FAMILIES for p in build_family(family, Path(out_root))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=TINY_DIR,
        help="directory that receives tiny-qwen3/ and tiny-llama/ (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    for path in build(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
