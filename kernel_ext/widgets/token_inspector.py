"""Token inspector: what a datum trains on, token by token.

Each token is a span coloured by its loss weight (trained / masked / negative), with id,
text, weight and logprob on hover. With a training client, "score" runs a forward pass
(in the background; the cell never waits) to get per-token logprobs: the view can then
colour by per-token loss, and the first scoring is kept as "before" for a before/after diff.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Optional, Sequence

from .. import render
from .common import widget_bundle


class TokenInspector:
    def __init__(self, data: Sequence[Any], tokenizer: Any = None, client: Any = None,
                 titles: Optional[Sequence[str]] = None):
        import ipywidgets as w

        self.data = list(data)
        if not self.data:
            raise ValueError("nothing to inspect: the list of datums is empty")
        self.tokenizer = tokenizer
        self.client = client
        self.titles = list(titles) if titles else [f"datum {i}" for i in range(len(self.data))]
        self.logprobs: list[Optional[list[float]]] = [None] * len(self.data)
        self.before: list[Optional[list[float]]] = [None] * len(self.data)
        self.error: Optional[str] = None
        self._scored = threading.Event()
        self.rows = [render.rows_from_datum(d, tokenizer) for d in self.data]  # validates early

        self.selector = w.Dropdown(options=[(t, i) for i, t in enumerate(self.titles)], value=0,
                                   description="datum", layout=w.Layout(width="260px"))
        self.mode = w.ToggleButtons(options=["weights", "loss", "diff"], value="weights")
        self.score_button = w.Button(description="score", tooltip="forward pass: per-token logprobs",
                                     disabled=client is None)
        self.score_button.add_class("wb-score")
        self.body = w.HTML(layout=w.Layout(max_height="400px", overflow="auto"))
        self.body.add_class("wb-token-inspector")
        self.selector.observe(lambda _: self.refresh(), names="value")
        self.mode.observe(lambda _: self.refresh(), names="value")
        self.score_button.on_click(lambda _: self.score())
        self.widget = w.VBox([w.HBox([self.selector, self.mode, self.score_button]), self.body])
        self.refresh()

    # ------------------------------------------------------------------ scoring

    def score(self) -> None:
        """Forward pass over all datums (background); the first result becomes 'before'."""
        if self.client is None:
            raise RuntimeError("scoring needs a training client (inspect ... --client VAR)")
        self._scored.clear()
        self.score_button.disabled = True
        future = self.client.forward(self.data, "cross_entropy")
        future.add_done_callback(self._on_scored)

    def _on_scored(self, future: Any) -> None:
        try:
            exc = future.exception()
            if exc is not None:
                self.error = f"{type(exc).__name__}: {exc}"
            else:
                self.error = None
                for i, out in enumerate(future.result().loss_fn_outputs):
                    lps = [float(v) for v in out["logprobs"].to_numpy().tolist()]
                    if self.before[i] is None:
                        self.before[i] = lps
                    self.logprobs[i] = lps
                    self.rows[i] = render.rows_from_datum(self.data[i], self.tokenizer, lps)
        finally:
            self.score_button.disabled = False
            self._scored.set()
            self.refresh()

    def wait_scored(self, timeout: float = 60.0) -> bool:
        return self._scored.wait(timeout)

    # ------------------------------------------------------------------ drawing

    def html_for(self, index: int, mode: Optional[str] = None) -> str:
        mode = mode or self.mode.value
        rows = self.rows[index]
        if mode != "weights" and self.logprobs[index] is None:
            return ('<div class="wb-note">no logprobs yet: press "score" (needs --client) '
                    'to colour by loss</div>' + render.tokens_html(rows, "weights"))
        before = None
        if mode == "diff":
            before = [None, *self.before[index]]  # position 0 is context (see render docstring)
        stats = render.summary(rows)
        head = " · ".join(f"{k} {v:.4g}" for k, v in stats.items())
        error = f'<div style="color:#c00">{html.escape(self.error)}</div>' if self.error else ""
        return (f'<div class="wb-summary" style="font-size:85%">{html.escape(self.titles[index])}: '
                f'{head}</div>{error}{render.legend_html(mode)}{render.tokens_html(rows, mode, before)}')

    def refresh(self) -> None:
        self.body.value = self.html_for(self.selector.value)

    def static_html(self) -> str:
        return "".join(self.html_for(i, "weights") for i in range(len(self.data)))

    def __repr__(self) -> str:
        return "\n\n".join(f"{t}:\n{render.tokens_text(rows)}" for t, rows in zip(self.titles, self.rows))

    def _repr_mimebundle_(self, **_: Any) -> dict:
        return widget_bundle(self.widget, repr(self), self.static_html())

    def detach(self) -> None:
        """Disconnected: the tokens and scores stay browsable; scoring is switched off."""
        self.client = None
        self.score_button.disabled = True

    def close(self) -> None:
        for widget in (self.selector, self.mode, self.score_button, self.body, *self.widget.children,
                       self.widget):
            widget.close()
