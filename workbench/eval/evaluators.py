"""Exact-match and NLL evaluators, and a helper that runs evaluators every N steps.

An evaluator is a callable `evaluator(client) -> dict[str, float]`. Training-client
evaluators score data with a forward pass (no gradients, no optimizer state touched);
sampling-client evaluators generate. Every evaluator submits all its requests before it
waits on any, so the server batches them into the same clock cycle.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Protocol, Sequence

from ..data import target_logprobs
from ..renderers.base import Message, Renderer
from ..types import Datum, SamplingParams


class TrainingClientEvaluator:
    """Base of evaluators called with a TrainingClient."""

    name: str = "eval"

    def __call__(self, training_client: Any) -> dict[str, float]:
        raise NotImplementedError


class SamplingClientEvaluator:
    """Base of evaluators called with a SamplingClient."""

    name: str = "eval"

    def __call__(self, sampling_client: Any) -> dict[str, float]:
        raise NotImplementedError


class _Checkable(Protocol):  # workbench.tasks.Problem has this shape
    def prompt_messages(self) -> list[Message]: ...
    def check(self, response: str) -> bool: ...


class NLLEvaluator(TrainingClientEvaluator):
    """Mean negative log-likelihood per trained token (and bits per byte) on held-out datums.

    Datums are next-token cross_entropy datums (`workbench.data.conversation_to_datum`):
    `target_tokens` and `weights`. Called with a TrainingClient it runs `forward` (no
    gradients); with a SamplingClient it uses `compute_logprobs` on input + last target.

    Metrics: `eval/<name>/nll` = -sum(w * logprob) / sum(w) in nats; `eval/<name>/tokens` =
    sum(w); with a `tokenizer`, `eval/<name>/bits_per_byte` over the weighted tokens that are
    not added (control) tokens such as <|im_end|>: their nats / ln 2 / their UTF-8 bytes.
    """

    def __init__(self, datums: Sequence[Datum], name: str = "nll", tokenizer: Any = None):
        if not datums:
            raise ValueError("NLLEvaluator needs at least one datum")
        for i, d in enumerate(datums):
            missing = {"target_tokens", "weights"} - set(d.loss_fn_inputs)
            if missing:
                raise ValueError(f"datums[{i}].loss_fn_inputs lacks {sorted(missing)}")
        self.datums = list(datums)
        self.name = name
        self.tokenizer = tokenizer

    def __call__(self, client: Any) -> dict[str, float]:
        if hasattr(client, "forward"):
            out = client.forward(self.datums, "cross_entropy").result()
            logprobs = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
        else:
            logprobs = target_logprobs(client, self.datums, "datums")
        return self.metrics_from_logprobs(logprobs)

    def metrics_from_logprobs(self, logprobs: list[list[float]]) -> dict[str, float]:
        """The metrics for given per-target logprobs (one list per datum)."""
        nats = weight = 0.0
        text_nats, text_bytes = 0.0, 0
        control = set(self.tokenizer.get_added_vocab().values()) if self.tokenizer is not None else set()
        for datum, lps in zip(self.datums, logprobs, strict=True):
            targets = datum.loss_fn_inputs["target_tokens"].tolist()
            weights = datum.loss_fn_inputs["weights"].tolist()
            if len(lps) != len(targets):
                raise ValueError(f"got {len(lps)} logprobs for a datum with {len(targets)} targets")
            counted = []
            for tok, w, lp in zip(targets, weights, lps):
                nats -= w * lp
                weight += w
                is_text = w > 0 and tok not in control
                counted.append(is_text)
                if is_text:
                    text_nats -= w * lp
            if self.tokenizer is not None:
                text_bytes += _counted_bytes(targets, counted, self.tokenizer)
        prefix = f"eval/{self.name}"
        metrics = {f"{prefix}/nll": nats / weight if weight else math.nan, f"{prefix}/tokens": weight}
        if self.tokenizer is not None:
            metrics[f"{prefix}/bits_per_byte"] = text_nats / math.log(2) / text_bytes if text_bytes else math.nan
        return metrics


def _counted_bytes(tokens: list[int], counted: list[bool], tokenizer: Any) -> int:
    """UTF-8 bytes of the counted tokens, decoding each contiguous run separately (a run
    decodes whole characters even where one character spans several byte-level tokens)."""
    total, run = 0, []
    for tok, keep in zip(tokens, counted):
        if keep:
            run.append(tok)
        elif run:
            total += len(tokenizer.decode(run).encode("utf-8"))
            run = []
    if run:
        total += len(tokenizer.decode(run).encode("utf-8"))
    return total


class ExactMatchEvaluator(SamplingClientEvaluator):
    """Fraction of problems whose sampled answer passes `problem.check(text)`.

    Each problem (e.g. `workbench.tasks.Problem`) gives `prompt_messages()` and
    `check(text)`. Sampling is greedy by default (temperature 0, stop at the renderer's
    end of turn, `max_tokens`). Metrics: `eval/<name>/exact_match` and
    `eval/<name>/parse_ok` (fraction of responses that ended their turn). The last run's
    (question, response, correct) triples stay in `self.last_results` for inspection.
    """

    def __init__(self, problems: Sequence[_Checkable], renderer: Renderer, name: str = "exact_match",
                 sampling_params: Optional[SamplingParams] = None, max_tokens: int = 32):
        if not problems:
            raise ValueError("ExactMatchEvaluator needs at least one problem")
        self.problems = list(problems)
        self.renderer = renderer
        self.name = name
        self.sampling_params = sampling_params or SamplingParams(
            max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences())
        self.last_results: list[tuple[list[Message], str, bool]] = []

    def __call__(self, sampling_client: Any) -> dict[str, float]:
        prompts = [self.renderer.build_generation_prompt(p.prompt_messages()) for p in self.problems]
        futures = [sampling_client.sample(prompt, 1, self.sampling_params) for prompt in prompts]
        correct = parsed = 0
        self.last_results = []
        for problem, future in zip(self.problems, futures):
            message, ok = self.renderer.parse_response(future.result().sequences[0].tokens)
            hit = ok and problem.check(message["content"])
            correct += hit
            parsed += ok
            self.last_results.append((problem.prompt_messages(), message["content"], hit))
        n = len(self.problems)
        return {f"eval/{self.name}/exact_match": correct / n, f"eval/{self.name}/parse_ok": parsed / n}


def run_evaluators(evaluators: Sequence[Any], training_client: Any = None, sampling_client: Any = None,
                   snapshot_name: str = "eval") -> dict[str, float]:
    """Run each evaluator on the client of its kind and merge their metrics.

    Sampling evaluators need `sampling_client`; without one, a snapshot of the training
    client's current weights is taken (`save_weights_and_get_sampling_client(snapshot_name)`).
    """
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        if isinstance(evaluator, SamplingClientEvaluator):
            if sampling_client is None:
                if training_client is None:
                    raise ValueError(f"{type(evaluator).__name__} needs a sampling or training client")
                sampling_client = training_client.save_weights_and_get_sampling_client(snapshot_name)
            metrics.update(evaluator(sampling_client))
        else:
            if training_client is None:
                raise ValueError(f"{type(evaluator).__name__} needs a training client")
            metrics.update(evaluator(training_client))
    return metrics


class PeriodicEvaluator:
    """Runs evaluators at steps 0, N, 2N, ... (and whenever `maybe_run(..., force=True)`)."""

    def __init__(self, evaluators: Sequence[Any], every_n_steps: int, run_at_start: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.evaluators = list(evaluators)
        self.every_n_steps = every_n_steps
        self.run_at_start = run_at_start

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and (step > 0 or self.run_at_start)

    def maybe_run(self, step: int, training_client: Any, sampling_client: Any = None,
                  force: bool = False) -> Optional[dict[str, float]]:
        """The evaluators' metrics if `step` is due (or `force`), else None."""
        if not (force or self.due(step)):
            return None
        return run_evaluators(self.evaluators, training_client, sampling_client, snapshot_name=f"eval-step-{step}")
