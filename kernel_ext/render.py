"""Pure rendering: tokens, loss weights and logprobs -> HTML spans and plain text.

No widgets and no I/O here, so every view (token inspector, sample view, rollout strips,
static fallbacks) is a function of plain lists and can be tested as strings.

HTML uses inline styles and `title` attributes only: JupyterLab strips `<style>` blocks and
scripts from untrusted output, while inline styles and hover titles render everywhere.

Token view alignment (one rule for every datum): position 0 is `model_input[0]` (context,
never trained); position i >= 1 is `target_tokens[i-1]`, predicted from `model_input[:i]`,
with `weights[i-1]` and, when known, `logprobs[i-1]`. For the usual shifted datum
(targets = inputs shifted by one) that is exactly the full sequence.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# Colours (background, text). Trained = green, masked = grey, negative weight = red.
TRAINED_RGB = (34, 160, 70)
NEGATIVE_RGB = (210, 50, 50)
MASKED_TEXT = "#8a8a8a"
SPECIAL_BORDER = "1px dashed #7a5cc7"
AMBER_RGB = (235, 175, 40)  # probability 1/2 in prob_colour (red 0 -> amber -> green 1)
DIVERGE_COLOUR = "#1f4fd1"  # the ring on the token where two generations first differ
BASE_STYLE = "white-space:pre-wrap;font-family:monospace;padding:0 1px;border-radius:2px;"


@dataclass(frozen=True)
class TokenRow:
    """One displayed token: id, decoded text, loss weight (None = context) and logprob."""

    id: int
    text: str
    weight: Optional[float] = None
    logprob: Optional[float] = None
    special: bool = False

    @property
    def loss(self) -> Optional[float]:
        """This token's contribution to a cross-entropy sum: -weight * logprob."""
        if self.logprob is None or self.weight is None:
            return None
        return -self.weight * self.logprob


def _floats(values: Any, n: int, name: str) -> Optional[list[float]]:
    if values is None:
        return None
    if hasattr(values, "to_numpy"):
        values = values.to_numpy()
    out = [float(v) for v in list(values)]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries, expected {n} (one per target token)")
    return out


def _ints(values: Any) -> list[int]:
    if hasattr(values, "to_ints"):
        return [int(t) for t in values.to_ints()]
    if hasattr(values, "to_numpy"):
        values = values.to_numpy()
    return [int(t) for t in list(values)]


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text of one token as the tokenizer decodes it (special tokens kept)."""
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def special_ids(tokenizer: Any) -> set[int]:
    if tokenizer is None:
        return set()
    return {int(t) for t in getattr(tokenizer, "all_special_ids", []) or []}


def rows_from_datum(datum: Any, tokenizer: Any = None, logprobs: Any = None) -> list[TokenRow]:
    """TokenRows of a `types.Datum` (see the alignment rule in the module docstring)."""
    inputs = _ints(datum.model_input)
    fn_inputs = datum.loss_fn_inputs
    if "target_tokens" not in fn_inputs:
        raise ValueError("the datum has no loss_fn_inputs['target_tokens'] to show")
    targets = _ints(fn_inputs["target_tokens"])
    if len(targets) != len(inputs):
        raise ValueError(f"target_tokens has {len(targets)} entries but model_input has {len(inputs)}")
    weights = _floats(fn_inputs.get("weights"), len(targets), "weights") or [1.0] * len(targets)
    lps = _floats(logprobs, len(targets), "logprobs")
    return rows_from_tokens([inputs[0], *targets], [None, *weights],
                            None if lps is None else [None, *lps], tokenizer)


def rows_from_tokens(ids: Sequence[int], weights: Optional[Sequence[Optional[float]]] = None,
                     logprobs: Optional[Sequence[Optional[float]]] = None,
                     tokenizer: Any = None) -> list[TokenRow]:
    """TokenRows of parallel lists (weights / logprobs may be None per token or altogether)."""
    for name, values in (("weights", weights), ("logprobs", logprobs)):
        if values is not None and len(values) != len(ids):
            raise ValueError(f"{name} has {len(values)} entries for {len(ids)} tokens")
    specials = special_ids(tokenizer)
    return [
        TokenRow(id=int(t), text=token_text(tokenizer, int(t)),
                 weight=None if weights is None or weights[i] is None else float(weights[i]),
                 logprob=None if logprobs is None or logprobs[i] is None else float(logprobs[i]),
                 special=int(t) in specials)
        for i, t in enumerate(ids)
    ]


# ---------------------------------------------------------------------------- colours

def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{max(0.0, min(1.0, alpha)):.2f})"


def weight_style(weight: Optional[float]) -> str:
    """Trained tokens green (stronger with |weight|), negative red, masked/context grey."""
    if weight is None or weight == 0:
        return f"color:{MASKED_TEXT};"
    rgb = TRAINED_RGB if weight > 0 else NEGATIVE_RGB
    return f"background:{_rgba(rgb, 0.25 + 0.5 * min(abs(weight), 1.0))};"


def heat_style(value: Optional[float], scale: float) -> str:
    """Orange heat for a non-negative quantity (a token's loss), saturating at `scale`."""
    if value is None:
        return f"color:{MASKED_TEXT};"
    return f"background:{_rgba((240, 120, 20), 0.08 + 0.85 * min(max(value, 0.0) / scale, 1.0))};"


def diff_style(delta: Optional[float], scale: float) -> str:
    """Green where the logprob went up after training, red where it went down."""
    if delta is None:
        return f"color:{MASKED_TEXT};"
    rgb = TRAINED_RGB if delta >= 0 else NEGATIVE_RGB
    return f"background:{_rgba(rgb, 0.08 + 0.8 * min(abs(delta) / scale, 1.0))};"


def prob_colour(logprob: float, alpha: float = 1.0) -> str:
    """Green for a likely token (probability near 1), amber around 1/2, red near 0."""
    p = math.exp(min(float(logprob), 0.0))
    lo, hi = (NEGATIVE_RGB, AMBER_RGB) if p < 0.5 else (AMBER_RGB, TRAINED_RGB)
    t = p / 0.5 if p < 0.5 else (p - 0.5) / 0.5
    return _rgba(tuple(round(l + t * (h - l)) for l, h in zip(lo, hi)), alpha)  # type: ignore[arg-type]


def pair_style(lp_a: float, lp_b: float) -> str:
    """A token scored by two models: fill = its probability under A, underline = under B."""
    return f"background-color:{prob_colour(lp_a, 0.4)};border-bottom:3px solid {prob_colour(lp_b)};"


def _visible(text: str, special: bool) -> str:
    """Escaped token text with whitespace made visible; special tokens shown by name."""
    if special:
        return html.escape(text or "<special>")
    shown = text.replace("\t", "\u2192\t").replace("\n", "\u21b5\n")
    if shown.strip() == "" and "\n" not in shown:
        shown = shown.replace(" ", "\u00b7")  # a lone space token would be invisible
    return html.escape(shown)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _title(row: TokenRow, extra: str = "") -> str:
    parts = [f"id {row.id}", f"text {row.text!r}", f"weight {_fmt(row.weight)}",
             f"logprob {_fmt(row.logprob)}"]
    if row.special:
        parts.append("special token")
    return html.escape(" | ".join(parts) + extra, quote=True)


def _span(row: TokenRow, style: str, extra_title: str = "", cls: str = "wb-token",
          title: Optional[str] = None) -> str:
    """One token's span; `title` (already escaped) replaces the default hover text. The special
    token border comes before `style`, so a style's own border side (an underline) wins."""
    border = f"border:{SPECIAL_BORDER};" if row.special else ""
    title = _title(row, extra_title) if title is None else title
    return (f'<span class="{cls}" data-id="{row.id}" style="{BASE_STYLE}{border}{style}" '
            f'title="{title}">{_visible(row.text, row.special)}</span>')


# ------------------------------------------------------------------------------ HTML

def tokens_html(rows: Sequence[TokenRow], mode: str = "weights",
                before: Optional[Sequence[Optional[float]]] = None) -> str:
    """Token spans in one `<div class="wb-tokens">`.

    mode "weights": colour by loss weight (trained / masked / negative).
    mode "loss": colour by per-token loss (-weight * logprob; needs logprobs).
    mode "diff": colour by logprob change against `before` (one logprob per row).
    """
    if mode not in ("weights", "loss", "diff"):
        raise ValueError(f"mode must be weights, loss or diff, got {mode!r}")
    if mode == "diff":
        if before is None or len(before) != len(rows):
            raise ValueError("mode 'diff' needs `before` with one logprob per token")
        deltas = [None if b is None or r.logprob is None else r.logprob - b for r, b in zip(rows, before)]
        scale = max([abs(d) for d in deltas if d is not None] or [1.0]) or 1.0
        spans = [_span(r, diff_style(d, scale), f" | before {_fmt(b)} | change {_fmt(d)}")
                 for r, b, d in zip(rows, before, deltas)]
    elif mode == "loss":
        losses = [r.loss if r.weight else None for r in rows]
        scale = max([v for v in losses if v is not None] or [1.0]) or 1.0
        spans = [_span(r, heat_style(v, scale), f" | loss {_fmt(v)}") for r, v in zip(rows, losses)]
    else:
        spans = [_span(r, weight_style(r.weight)) for r in rows]
    return f'<div class="wb-tokens" data-mode="{mode}" style="line-height:1.8">{"".join(spans)}</div>'


def pair_tokens_html(rows: Sequence[TokenRow], lp_a: Sequence[float], lp_b: Sequence[float],
                     labels: tuple[str, str] = ("A", "B"), mark_at: Optional[int] = None) -> str:
    """Token spans scored by two models: the fill is the token's probability under model A,
    the underline under model B (`pair_style`). The token at `mark_at` (where two generations
    first differ) is ringed and has class `wb-diverge`. Hover: both logprobs and A - B."""
    if len(lp_a) != len(rows) or len(lp_b) != len(rows):
        raise ValueError(f"{len(rows)} tokens but {len(lp_a)} logprobs under A and {len(lp_b)} under B")
    spans = []
    for i, (row, a, b) in enumerate(zip(rows, lp_a, lp_b)):
        marked = i == mark_at
        parts = [f"#{i}", f"id {row.id}", f"text {row.text!r}", f"logprob {labels[0]} {_fmt(a)}",
                 f"logprob {labels[1]} {_fmt(b)}", f"{labels[0]} - {labels[1]} {_fmt(a - b)}"]
        parts += ["first divergence"] * marked + ["special token"] * row.special
        style = pair_style(a, b) + (f"box-shadow:0 0 0 2px {DIVERGE_COLOUR};" if marked else "")
        spans.append(_span(row, style, cls="wb-token wb-diverge" if marked else "wb-token",
                           title=html.escape(" | ".join(parts), quote=True)))
    return f'<div class="wb-tokens" data-mode="pair" style="line-height:2">{"".join(spans)}</div>'


def pair_legend_html(labels: tuple[str, str] = ("A", "B")) -> str:
    swatch = '<span style="{}padding:0 4px;margin-right:8px">{}</span>'
    a, b = (html.escape(label) for label in labels)
    items = [(pair_style(0.0, 0.0), f"likely under {a} (fill) and {b} (underline)"),
             (pair_style(-5.0, -5.0), "unlikely under both"),
             (pair_style(0.0, -5.0), f"likely under {a}, not under {b}"),
             (f"box-shadow:0 0 0 2px {DIVERGE_COLOUR};", "first divergence")]
    return '<div class="wb-legend" style="font-size:85%">' + "".join(
        swatch.format(style, label) for style, label in items) + "</div>"


def legend_html(mode: str = "weights") -> str:
    swatch = '<span style="{}padding:0 4px;margin-right:8px">{}</span>'
    if mode == "weights":
        items = [(weight_style(1.0), "trained"), (weight_style(0.0), "masked"),
                 (weight_style(-1.0), "negative weight"), (f"border:{SPECIAL_BORDER};", "special")]
    elif mode == "loss":
        items = [(heat_style(0.0, 1.0), "low loss"), (heat_style(1.0, 1.0), "high loss")]
    else:
        items = [(diff_style(1.0, 1.0), "logprob up"), (diff_style(-1.0, 1.0), "logprob down")]
    return '<div class="wb-legend" style="font-size:85%">' + "".join(
        swatch.format(style, label) for style, label in items) + "</div>"


def summary(rows: Sequence[TokenRow]) -> dict[str, float]:
    trained = [r for r in rows if r.weight]
    losses = [r.loss for r in trained if r.loss is not None]
    out = {"tokens": float(len(rows)), "trained": float(sum(1 for r in rows if r.weight and r.weight > 0)),
           "negative": float(sum(1 for r in rows if r.weight and r.weight < 0))}
    if losses:
        out["loss:sum"] = float(sum(losses))
    return out


def heat_strip_html(logprobs: Sequence[float], texts: Optional[Sequence[str]] = None,
                    cell_px: int = 6) -> str:
    """A compact strip: one coloured cell per token, darker = less likely (low logprob)."""
    cells = []
    for i, lp in enumerate(logprobs):
        p = math.exp(min(float(lp), 0.0))
        tip = f"#{i} logprob {lp:.4g}" + (f" | {texts[i]!r}" if texts else "")
        cells.append(f'<span class="wb-heat" style="display:inline-block;width:{cell_px}px;height:12px;'
                     f'background:{_rgba((200, 40, 40), 1.0 - p)}" title="{html.escape(tip, quote=True)}"></span>')
    return f'<span class="wb-strip" style="border:1px solid #ccc;line-height:0">{"".join(cells)}</span>'


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "wb-table") -> str:
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='padding:2px 8px'>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------ text

def tokens_text(rows: Sequence[TokenRow]) -> str:
    """Terminal fallback: trained runs in [[...]], negative runs in {{...}}, masked plain;
    special tokens in ⟨...⟩. The marks never come from the tokens themselves."""
    out, current = [], None
    for row in rows:
        kind = "trained" if row.weight and row.weight > 0 else "negative" if row.weight and row.weight < 0 else "masked"
        if kind != current:
            out.append({"trained": "]]", "negative": "}}"}.get(current, ""))
            out.append({"trained": "[[", "negative": "{{"}.get(kind, ""))
            current = kind
        out.append(f"\u27e8{row.text}\u27e9" if row.special else row.text)
    out.append({"trained": "]]", "negative": "}}"}.get(current, ""))
    return "".join(out)


def table_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------ static plot

def svg_lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], width: int = 480,
              height: int = 200, title: str = "") -> str:
    """A dependency-free static line plot (inline SVG) for places widgets cannot render."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    pad = 30
    parts = [f'<svg class="wb-static-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" style="background:#fff;border:1px solid #ddd">']
    if title:
        parts.append(f'<text x="{pad}" y="14" font-size="12">{html.escape(title)}</text>')
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        sx = (width - 2 * pad) / ((x1 - x0) or 1.0)
        sy = (height - 2 * pad) / ((y1 - y0) or 1.0)
        for i, (name, (xs, ys)) in enumerate(series.items()):
            coords = " ".join(f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}"
                              for x, y in zip(xs, ys) if math.isfinite(y))
            colour = palette[i % len(palette)]
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}">'
                         f'<title>{html.escape(name)}</title></polyline>')
            parts.append(f'<text x="{width - pad - 120}" y="{14 + 12 * i}" font-size="10" '
                         f'fill="{colour}">{html.escape(name)}</text>')
        parts.append(f'<text x="2" y="{pad}" font-size="9">{y1:.4g}</text>'
                     f'<text x="2" y="{height - pad}" font-size="9">{y0:.4g}</text>')
    else:
        parts.append(f'<text x="{pad}" y="{height // 2}" font-size="12">no data yet</text>')
    parts.append("</svg>")
    return "".join(parts)
