"""CompareView: two models' generations for the same prompts, side by side.

`compare(a, b, prompts, params)` samples every prompt from both sampling clients with the
same SamplingParams (so the same seed), then scores each side's generation under the other
model (`compute_logprobs` on prompt + generation). Every generated token thus has a logprob
under A and one under B: for a side's own tokens the sampler's (the model's temperature-1
logprobs, the quantity compute_logprobs reports), for the other side's the scorer's. Each
round's futures are all submitted before any is awaited, so the server batches them: round
one samples, round two scores (it needs round one's tokens).

The view is static HTML (inline styles and hover titles, so it renders in JupyterLab, in
nbconvert and on GitHub) with a text form; tests read `comparisons`.
"""

from __future__ import annotations

import html
import numbers
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from workbench import types

from . import render


@dataclass(frozen=True)
class Generation:
    """One side's completion of one prompt, each token scored under both models."""

    tokens: list[int]
    lp_a: list[float]  # lp_a[i]: logprob of tokens[i] under model A, given the prompt and tokens[:i]
    lp_b: list[float]  # the same under model B
    text: str  # the tokens decoded together
    stop_reason: str


@dataclass(frozen=True)
class Comparison:
    """One prompt through both models."""

    prompt: str  # as given; token prompts decoded
    prompt_tokens: list[int]
    a: Generation
    b: Generation
    divergence: Optional[int]  # first index where a.tokens and b.tokens differ; None if equal


def first_divergence(x: Sequence[int], y: Sequence[int]) -> Optional[int]:
    """The first index where x and y differ (the shorter one's length if it is a prefix of the
    other); None if they are equal."""
    for i, (s, t) in enumerate(zip(x, y)):
        if s != t:
            return i
    return None if len(x) == len(y) else min(len(x), len(y))


def _is_tokens(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value))


def _decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(f"<{t}>" for t in tokens)
    return tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prompts_from(value: Any, tokenizer: Any, renderer: Any = None) -> tuple[list[types.ModelInput], list[str]]:
    """Model inputs and display texts of a string, a ModelInput, a token list, or a list of
    those. With a renderer, each string is one user turn in its chat template (a generation
    prompt); otherwise strings are encoded as they are. ValueError / TypeError naming the
    prompt on bad input."""
    if isinstance(value, (str, types.ModelInput)) or _is_tokens(value):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a string or a list of strings, ModelInputs or token lists, "
                        f"got a {type(value).__name__}")
    if not value:
        raise ValueError("the list of prompts is empty")
    inputs, texts = [], []
    for i, prompt in enumerate(value):
        if isinstance(prompt, str):
            if renderer is not None:
                model_input = renderer.build_generation_prompt([{"role": "user", "content": prompt}])
            else:
                model_input = types.ModelInput.from_ints(tokenizer.encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, types.ModelInput):
            model_input = prompt
        elif _is_tokens(prompt):
            model_input = types.ModelInput.from_ints(prompt)
        else:
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}; expected a string, a ModelInput "
                            "or a list of token ids")
        if model_input.length == 0:
            raise ValueError(f"prompt {i} is empty")
        inputs.append(model_input)
        texts.append(prompt if isinstance(prompt, str) else _decode(tokenizer, model_input.to_ints()))
    return inputs, texts


def compare(client_a: Any, client_b: Any, prompts: Sequence[types.ModelInput], params: types.SamplingParams,
            labels: tuple[str, str] = ("A", "B"), texts: Optional[Sequence[str]] = None,
            tokenizer: Any = None) -> "CompareView":
    """Sample each prompt once from both clients with the same params (a seed is drawn when
    params has none, so both sides share it) and score each generation under both models."""
    if params.seed is None:
        params = params.model_copy(update={"seed": random.randrange(2**31)})
    tokenizer = tokenizer if tokenizer is not None else client_a.get_tokenizer()
    texts = list(texts) if texts is not None else [_decode(tokenizer, p.to_ints()) for p in prompts]
    if len(texts) != len(prompts):
        raise ValueError(f"{len(texts)} texts for {len(prompts)} prompts")
    sampled = [(client_a.sample(p, 1, params), client_b.sample(p, 1, params)) for p in prompts]
    seqs = [(fa.result().sequences[0], fb.result().sequences[0]) for fa, fb in sampled]
    scored = [(client_b.compute_logprobs(_joined(p, sa.tokens)), client_a.compute_logprobs(_joined(p, sb.tokens)))
              for p, (sa, sb) in zip(prompts, seqs)]
    comparisons = []
    for prompt, text, (sa, sb), (b_of_a, a_of_b) in zip(prompts, texts, seqs, scored):
        n = prompt.length
        gen_a = _generation(sa, list(sa.logprobs), b_of_a.result()[n:], tokenizer)
        gen_b = _generation(sb, a_of_b.result()[n:], list(sb.logprobs), tokenizer)
        comparisons.append(Comparison(text, prompt.to_ints(), gen_a, gen_b,
                                      first_divergence(gen_a.tokens, gen_b.tokens)))
    return CompareView(comparisons, labels, tokenizer, params)


def _joined(prompt: types.ModelInput, tokens: Sequence[int]) -> types.ModelInput:
    return types.ModelInput.from_ints(prompt.to_ints() + list(tokens))


def _generation(seq: Any, lp_a: Sequence[float], lp_b: Sequence[float], tokenizer: Any) -> Generation:
    tokens = [int(t) for t in seq.tokens]
    if not len(lp_a) == len(lp_b) == len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(lp_a)} logprobs under A and {len(lp_b)} under B")
    return Generation(tokens, [float(v) for v in lp_a], [float(v) for v in lp_b], _decode(tokenizer, tokens),
                      str(seq.stop_reason))


class CompareView:
    """Per prompt, both generations side by side; each token's fill is its probability under
    model A and its underline under model B; the first differing token is ringed."""

    def __init__(self, comparisons: Sequence[Comparison], labels: tuple[str, str] = ("A", "B"),
                 tokenizer: Any = None, params: Optional[types.SamplingParams] = None):
        self.comparisons = list(comparisons)
        self.labels = (str(labels[0]), str(labels[1]))
        self.tokenizer = tokenizer
        self.params = params
        self.rows = [(render.rows_from_tokens(c.a.tokens, tokenizer=tokenizer),
                      render.rows_from_tokens(c.b.tokens, tokenizer=tokenizer)) for c in self.comparisons]

    @property
    def divergences(self) -> list[Optional[int]]:
        return [c.divergence for c in self.comparisons]

    @property
    def texts(self) -> list[tuple[str, str]]:
        return [(c.a.text, c.b.text) for c in self.comparisons]

    def _settings(self) -> str:
        p = self.params
        if p is None:
            return ""
        return f"max_tokens {p.max_tokens}, temperature {p.temperature:g}, seed {p.seed}"

    # ---------------------------------------------------------------------- HTML

    def _side_html(self, which: str, gen: Generation, rows: list, divergence: Optional[int]) -> str:
        label = self.labels[0 if which == "A" else 1]
        head = (f'<div class="wb-compare-side-head" style="font-size:85%"><b>{which}: {html.escape(label)}</b> '
                f'({html.escape(gen.stop_reason)}, {len(gen.tokens)} tokens, sum logprob under A '
                f'{sum(gen.lp_a):.4g}, under B {sum(gen.lp_b):.4g})</div>')
        return head + render.pair_tokens_html(rows, gen.lp_a, gen.lp_b, ("A", "B"), divergence)

    def _comparison_html(self, i: int) -> str:
        c = self.comparisons[i]
        rows_a, rows_b = self.rows[i]
        note = ("identical generations" if c.divergence is None
                else f"first divergence at token {c.divergence}")
        # text-align: JupyterLab right-aligns table cells by default.
        cell = '<td style="vertical-align:top;text-align:left;width:50%;padding:2px 6px">{}</td>'
        return (f'<div class="wb-compare-item" style="margin:6px 0">'
                f'<div class="wb-compare-prompt" style="font-family:monospace;color:#555;white-space:pre-wrap">'
                f'[{i}] {html.escape(c.prompt)}</div>'
                f'<div class="wb-compare-note" style="font-size:85%">{note}</div>'
                f'<table class="wb-compare-pair" style="width:100%;table-layout:fixed"><tr>'
                f'{cell.format(self._side_html("A", c.a, rows_a, c.divergence))}'
                f'{cell.format(self._side_html("B", c.b, rows_b, c.divergence))}</tr></table></div>')

    def _repr_html_(self) -> str:
        a, b = (html.escape(label) for label in self.labels)
        head = (f'<div class="wb-compare-head">A = <b>{a}</b> · B = <b>{b}</b> · '
                f'{len(self.comparisons)} prompt{"s" * (len(self.comparisons) != 1)} · '
                f'{html.escape(self._settings())}</div>')
        body = "".join(self._comparison_html(i) for i in range(len(self.comparisons)))
        return f'<div class="wb-compare">{head}{render.pair_legend_html(("A", "B"))}{body}</div>'

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return {"text/plain": repr(self), "text/html": self._repr_html_()}

    # ---------------------------------------------------------------------- text

    def __repr__(self) -> str:
        lines = [f"CompareView A: {self.labels[0]}  B: {self.labels[1]}  ({self._settings()})"]
        for i, (c, rows) in enumerate(zip(self.comparisons, self.rows)):
            note = "identical" if c.divergence is None else f"diverge at token {c.divergence} (marked \u2016)"
            lines.append(f"[{i}] {c.prompt!r}: {note}")
            for which, gen, side_rows in (("A", c.a, rows[0]), ("B", c.b, rows[1])):
                pieces = [r.text for r in side_rows]
                if c.divergence is not None and c.divergence <= len(pieces):
                    pieces.insert(c.divergence, "\u2016")
                lines.append(f"  {which}: {''.join(pieces)!r}  [{gen.stop_reason}, {len(gen.tokens)} tokens, "
                             f"sum logprob A {sum(gen.lp_a):.4g} B {sum(gen.lp_b):.4g}]")
        return "\n".join(lines)
