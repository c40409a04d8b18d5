"""Evaluators that run on a client and return metrics named `eval/<name>/<metric>`.

    nll = NLLEvaluator(held_out_datums, name="held_out", tokenizer=tokenizer)
    em = ExactMatchEvaluator(held_out_problems, renderer, name="recall")
    nll(training_client)        # {"eval/held_out/nll": ..., "eval/held_out/bits_per_byte": ...}
    em(sampling_client)         # {"eval/recall/exact_match": ..., "eval/recall/parse_ok": ...}

    evals = PeriodicEvaluator([nll, em], every_n_steps=10)
    for step in range(n_steps):
        metrics = evals.maybe_run(step, training_client) or {}
        ...
"""

from .evaluators import (
    ExactMatchEvaluator, NLLEvaluator, PeriodicEvaluator, SamplingClientEvaluator,
    TrainingClientEvaluator, run_evaluators,
)

__all__ = [
    "ExactMatchEvaluator", "NLLEvaluator", "PeriodicEvaluator", "SamplingClientEvaluator",
    "TrainingClientEvaluator", "run_evaluators",
]
