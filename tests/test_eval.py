"""Evaluators: metric arithmetic by hand, then SFT on a synthetic task against a real server."""

from __future__ import annotations

import math
import time

import pytest

from server.tiny import load_tiny_tokenizer
from workbench import tasks, types
from workbench.data import SupervisedDataset, conversation_to_datum, datum_from_model_input_weights
from workbench.eval import ExactMatchEvaluator, NLLEvaluator, PeriodicEvaluator, run_evaluators
from workbench.renderers import get_renderer


def test_nll_and_bits_per_byte_by_hand():
    tokenizer = load_tiny_tokenizer("tiny-qwen3")
    text = tokenizer.encode("hé", add_special_tokens=False)  # "é" is 2 UTF-8 bytes
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = [7] + text + [im_end]
    datum = datum_from_model_input_weights(types.ModelInput.from_ints(tokens), [0.0] + [1.0] * (len(tokens) - 1))
    n = len(tokens) - 1
    logprobs = [-0.5 * (i + 1) for i in range(n)]
    metrics = NLLEvaluator([datum], name="toy", tokenizer=tokenizer).metrics_from_logprobs([logprobs])
    assert metrics["eval/toy/nll"] == pytest.approx(-sum(logprobs) / n)
    assert metrics["eval/toy/tokens"] == n
    # <|im_end|> (a control token) counts for nll but not for bits per byte: 3 bytes of text.
    text_nats = -sum(logprobs[:-1])
    assert metrics["eval/toy/bits_per_byte"] == pytest.approx(text_nats / math.log(2) / 3)
    assert "eval/toy/bits_per_byte" not in NLLEvaluator([datum]).metrics_from_logprobs([logprobs])
    with pytest.raises(ValueError, match="logprobs for a datum with"):
        NLLEvaluator([datum]).metrics_from_logprobs([logprobs[:-1]])
    with pytest.raises(ValueError, match="lacks"):
        NLLEvaluator([types.Datum(model_input=datum.model_input, loss_fn_inputs={})])


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self, timeout=None):
        return self.value


class _ReplaySampler:
    """Answers each prompt with fixed tokens: tests the evaluator's scoring, not a model."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]]):
        self.replies = replies
        self.params = []

    def sample(self, prompt, num_samples, sampling_params):
        self.params.append(sampling_params)
        seq = types.SampledSequence(stop_reason="stop", tokens=self.replies[tuple(prompt.to_ints())])
        return _Done(types.SampleResponse(sequences=[seq]))


def test_exact_match_scoring():
    tokenizer = load_tiny_tokenizer("tiny-qwen3")
    renderer = get_renderer("qwen3", tokenizer)
    problems = tasks.get_task("arithmetic").split(4, 0, seed=1)[0]
    im_end = renderer.get_stop_sequences()[0]

    def reply(text, end=True):
        return tokenizer.encode("<think>\n\n</think>\n\n" + text, add_special_tokens=False) + ([im_end] if end else [])

    answers = [reply(problems[0].answer), reply("-1"), reply(problems[2].answer, end=False), reply(problems[3].answer)]
    sampler = _ReplaySampler({tuple(renderer.build_generation_prompt(p.prompt_messages()).to_ints()): a
                              for p, a in zip(problems, answers)})
    evaluator = ExactMatchEvaluator(problems, renderer, name="add", max_tokens=7)
    # Right, wrong, right but cut before its end of turn (not counted), right.
    assert evaluator(sampler) == {"eval/add/exact_match": 0.5, "eval/add/parse_ok": 0.75}
    assert [hit for _, _, hit in evaluator.last_results] == [True, False, False, True]
    params = sampler.params[0]
    assert params.temperature == 0.0 and params.max_tokens == 7 and params.stop == [im_end]


def test_periodic_evaluator_cadence():
    calls = []

    def evaluator(client):
        calls.append(client)
        return {"eval/x/n": float(len(calls))}

    periodic = PeriodicEvaluator([evaluator], every_n_steps=5)
    ran = {step: periodic.maybe_run(step, training_client="tc") for step in range(12)}
    assert [s for s, m in ran.items() if m is not None] == [0, 5, 10]
    assert periodic.maybe_run(7, "tc", force=True) == {"eval/x/n": 4.0}
    assert not PeriodicEvaluator([evaluator], 5, run_at_start=False).due(0)
    with pytest.raises(ValueError, match="every_n_steps"):
        PeriodicEvaluator([evaluator], 0)


def test_sft_on_recall_lowers_held_out_nll(service):
    """SFT of tiny-qwen3 on the recall task: held-out NLL falls, measured by the evaluators.

    Measured (2 CPU cores shared with other jobs, load ~8.5): held-out NLL 8.25 -> 1.35
    (step 10) -> 0.69 (step 20), bits per byte 8.4 -> ~0.8, greedy exact match 0 -> 0.19,
    lr 3e-3, 16 conversations per step, rank 16. 40 steps reach exact match ~0.69 but
    take too long for this suite, so exact match is reported here, not asserted.
    """
    started = time.time()
    training = service.create_lora_training_client(base_model="tiny-qwen3", rank=16, seed=0)
    tokenizer = training.get_tokenizer()
    renderer = get_renderer("qwen3", tokenizer)
    train, held_out = tasks.get_task("recall", n_keys=8).split(n_train=32, n_test=16, seed=0)
    held_out_data = [conversation_to_datum(p.conversation(), renderer) for p in held_out]
    nll = NLLEvaluator(held_out_data, name="recall", tokenizer=tokenizer)

    # Before any step the adapter is a no-op (B = 0): the base sampler scores held-out data
    # exactly as the training client's forward pass does.
    base = service.create_sampling_client(base_model="tiny-qwen3")
    via_forward, via_sampler = nll(training), nll(base)
    assert via_sampler["eval/recall/nll"] == pytest.approx(via_forward["eval/recall/nll"], rel=1e-4)
    assert via_forward["eval/recall/nll"] > 5.0  # random init: near ln(4096) = 8.3

    periodic = PeriodicEvaluator([nll], every_n_steps=10)
    dataset = SupervisedDataset([conversation_to_datum(p.conversation(), renderer) for p in train],
                                batch_size=16, seed=0)
    history = {}
    adam = types.AdamParams(learning_rate=3e-3)
    for step in range(20):
        history[step] = periodic.maybe_run(step, training)
        dataset.set_epoch(step // len(dataset))
        # Submitted back to back: both run in the same server cycle.
        fb = training.forward_backward(dataset.get_batch(step % len(dataset)), "cross_entropy")
        opt = training.optim_step(adam)
        fb.result(), opt.result()
    final = run_evaluators([nll, ExactMatchEvaluator(held_out, renderer, name="recall", max_tokens=8)],
                           training, snapshot_name="final")
    curve = [history[0]["eval/recall/nll"], history[10]["eval/recall/nll"], final["eval/recall/nll"]]
    print(f"held-out nll {curve}, exact match {final['eval/recall/exact_match']}, "
          f"{time.time() - started:.1f} s")
    assert history[0] == via_forward and all(history[s] is None for s in history if s % 10)
    assert curve[1] < curve[0] and curve[2] < 0.3 * curve[0]
    assert final["eval/recall/bits_per_byte"] < 0.3 * history[0]["eval/recall/bits_per_byte"]
    assert 0.0 <= final["eval/recall/exact_match"] <= final["eval/recall/parse_ok"] <= 1.0
