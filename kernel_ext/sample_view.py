"""SampleView: a prompt's completions with per-token logprobs, as HTML and text."""

from __future__ import annotations

import html
from typing import Any

from . import render


class SampleView:
    def __init__(self, prompt: str, response: Any, tokenizer: Any = None):
        self.prompt = prompt
        self.response = response
        self.tokenizer = tokenizer
        # Completion tokens have no loss weight; colour them by probability (logprob heat).
        self.rows = [render.rows_from_tokens(seq.tokens, None, seq.logprobs, tokenizer)
                     for seq in response.sequences]

    @property
    def texts(self) -> list[str]:
        return ["".join(r.text for r in rows) for rows in self.rows]

    def _repr_html_(self) -> str:
        parts = [f'<div class="wb-sample-prompt" style="font-family:monospace;color:#555">'
                 f'{html.escape(self.prompt)}</div>']
        for i, (seq, rows) in enumerate(zip(self.response.sequences, self.rows)):
            total = sum(r.logprob for r in rows if r.logprob is not None)
            # Per-token "loss" view: surprise -logprob, so unlikely tokens stand out.
            surprise = [render.TokenRow(r.id, r.text, 1.0, r.logprob, r.special) for r in rows]
            parts.append(f'<div class="wb-completion"><b>#{i}</b> ({seq.stop_reason}, {len(rows)} tokens, '
                         f'sum logprob {total:.4g}) {render.tokens_html(surprise, "loss")}</div>')
        return "".join(parts)

    def __repr__(self) -> str:
        lines = [f"prompt: {self.prompt!r}"]
        for i, (seq, rows) in enumerate(zip(self.response.sequences, self.rows)):
            lps = " ".join("-" if r.logprob is None else f"{r.logprob:.2f}" for r in rows)
            lines.append(f"#{i} [{seq.stop_reason}] {''.join(r.text for r in rows)!r}\n   logprobs: {lps}")
        return "\n".join(lines)
