"""Datum building, JSONL loading, batching and the synthetic tasks (no server needed)."""

from __future__ import annotations

import json
import random

import pytest

from server.tiny import load_tiny_tokenizer
from workbench import tasks
from workbench.data import (
    SupervisedDataset, conversation_to_datum, datum_from_model_input_weights, load_conversations_jsonl,
)
from workbench.renderers import TrainOnWhat, get_renderer
from workbench.types import ModelInput


def test_datum_is_next_token_shifted_and_truncated():
    model_input = ModelInput.from_ints([10, 11, 12, 13, 14])
    weights = [0, 0, 1, 1, 1]
    datum = datum_from_model_input_weights(model_input, weights)
    assert datum.model_input.to_ints() == [10, 11, 12, 13]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [11, 12, 13, 14]
    assert datum.loss_fn_inputs["weights"].tolist() == [0, 1, 1, 1]
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["weights"].dtype == "float32"
    short = datum_from_model_input_weights(model_input, weights, max_length=3)
    assert short.model_input.to_ints() == [10, 11]
    assert short.loss_fn_inputs["target_tokens"].tolist() == [11, 12]
    assert short.loss_fn_inputs["weights"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="3 entries for 5 tokens"):
        datum_from_model_input_weights(model_input, [1, 1, 1])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        datum_from_model_input_weights(ModelInput.from_ints([1]), [1])


def test_conversation_to_datum_trains_the_answer_only():
    tokenizer = load_tiny_tokenizer("tiny-qwen3")
    renderer = get_renderer("qwen3", tokenizer)
    messages = [{"role": "user", "content": "2+3=?"}, {"role": "assistant", "content": "5"}]
    datum = conversation_to_datum(messages, renderer, max_length=512)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert datum.model_input.to_ints() == full[:-1]
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    trained = [t for t, w in zip(targets, datum.loss_fn_inputs["weights"].tolist()) if w]
    assert tokenizer.decode(trained) == "<think>\n\n</think>\n\n5<|im_end|>"
    both = conversation_to_datum(messages, renderer, None, TrainOnWhat.ALL_MESSAGES)
    assert sum(both.loss_fn_inputs["weights"].tolist()) > sum(datum.loss_fn_inputs["weights"].tolist())


def test_jsonl_loading_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]
    good.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_conversations_jsonl(good) == [rows[0]["messages"], rows[1]]
    bad_cases = {
        '{"messages": [{"role": "user"}]}': r"bad.jsonl:2: messages\[0\] \(user\) has no string 'content'",
        '{"messages": [': r"bad.jsonl:2: invalid JSON",
        '{"text": "hi"}': r"bad.jsonl:2: expected",
        '[{"content": "x"}]': r"bad.jsonl:2: messages\[0\] has no string 'role'",
    }
    for line, pattern in bad_cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=pattern):
            load_conversations_jsonl(bad)


def test_batches_fixed_size_shuffled_by_seed_and_epoch():
    items = list(range(10))
    ds = SupervisedDataset(items, batch_size=3, seed=7)
    assert len(ds) == 3
    epoch0 = [ds.get_batch(i) for i in range(len(ds))]
    assert all(len(b) == 3 for b in epoch0)
    assert len({x for b in epoch0 for x in b}) == 9  # no repeats within an epoch
    assert [ds.get_batch(i) for i in range(3)] == list(SupervisedDataset(items, 3, seed=7))  # deterministic
    ds.set_epoch(1)
    assert list(ds) != epoch0  # reshuffled per epoch
    assert list(SupervisedDataset(items, 3, seed=8)) != epoch0
    assert list(SupervisedDataset(items, 5, shuffle=False)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(IndexError):
        ds.get_batch(3)
    with pytest.raises(ValueError, match="larger than the dataset"):
        SupervisedDataset(items, 11)


@pytest.mark.parametrize("name", tasks.task_names())
def test_task_splits_are_deterministic_and_disjoint(name):
    task = tasks.get_task(name)
    train, test = task.split(n_train=40, n_test=8, seed=3)
    assert len(train) == 40 and len(test) == 8
    questions = [p.question for p in train + test]
    assert len(set(questions)) == len(questions)  # no overlap, no duplicates
    again = tasks.get_task(name).split(n_train=40, n_test=8, seed=3)
    assert (train, test) == again
    assert tasks.get_task(name).split(40, 8, seed=4) != (train, test)
    for p in train + test:
        assert p.check(p.answer) and p.check(f" {p.answer}\n") and p.reward(p.answer) == 1.0
        assert not p.check(p.answer + "0") and p.reward("") == 0.0
        conv = p.conversation()
        assert conv[-1] == {"role": "assistant", "content": p.answer}
        assert conv[:-1] == p.prompt_messages()


def test_task_answers_are_correct():
    for p in tasks.get_task("arithmetic", max_operand=9).split(30, 5)[0]:
        a, b = p.question.removesuffix("=?").split("+")
        assert int(p.answer) == int(a) + int(b)
    for p in tasks.get_task("reverse").split(30, 5)[0]:
        assert p.answer.split() == p.question.removeprefix("Reverse: ").split()[::-1]
    recall = tasks.get_task("recall", n_keys=4)
    for p in recall.split(12, 4)[0]:
        key = next(k for k in recall.table if k in p.question)
        assert p.answer == recall.table[key]
    with pytest.raises(ValueError, match="distinct questions"):
        recall.split(30, 10)  # 4 keys x 6 templates = 24 questions
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("sorting")


def test_capitals_held_out_asks_trained_facts_in_unseen_phrasings():
    task = tasks.get_task("capitals", n_countries=8)
    train, held_out = task.split(n_train=32, n_test=32, seed=0)
    assert len(train) == len(held_out) == 32
    countries = set(task.table)

    def country(p):
        (c,) = [c for c in countries if c in p.question]
        return c

    # Every country is asked 4 times in each split, and answered with its invented capital.
    for problems in (train, held_out):
        assert sorted(map(country, problems)) == sorted(sorted(countries) * 4)
        for p in problems:
            assert p.answer == f"The capital of {country(p)} is {task.table[country(p)]}."
            assert p.check(p.answer) and not p.check(f"The capital of {country(p)} is Paris.")
    # No held-out phrasing occurs in training: held-out questions test paraphrase, not strings.
    phrasings = lambda problems: {p.question.replace(country(p), "{country}") for p in problems}  # noqa: E731
    assert phrasings(train) == set(tasks.CAPITALS_TRAIN_TEMPLATES)
    assert phrasings(held_out) == set(tasks.CAPITALS_HELD_OUT_TEMPLATES)
    # Invented: neither a country nor a capital is a real one, nor its own capital.
    real = {name for pair in tasks.REAL_CAPITALS for name in pair}
    assert all(c != cap and c not in real and cap not in real for c, cap in tasks.CAPITALS)
    # Deterministic per seed; a smaller split is spread over the countries too.
    assert task.split(32, 32, seed=0) == (train, held_out)
    assert task.split(32, 32, seed=1) != (train, held_out)
    assert len({country(p) for p in task.split(8, 8, seed=2)[1]}) == 8
    generated = {task.generate(random.Random(i)).question for i in range(300)}
    assert generated <= {p.question for p in train + held_out} and len(generated) > 48
    with pytest.raises(ValueError, match="32 training questions"):
        task.split(33, 0)
    with pytest.raises(ValueError, match="n_countries"):
        tasks.get_task("capitals", n_countries=13)


def test_capitals_known_split_is_real_countries_checked_by_name():
    task = tasks.get_task("capitals", n_countries=8)
    known_train, known_held_out = task.known_split(n_train=16, n_test=8, seed=0)
    half = len(tasks.REAL_CAPITALS) // 2
    trained, held = dict(tasks.REAL_CAPITALS[:half]), dict(tasks.REAL_CAPITALS[half:])
    assert {c for p in known_train for c in trained if c in p.question} == set(trained)
    assert {c for p in known_held_out for c in held if c in p.question} == set(held)
    train_phrasings = {t.format(country=c) for t in tasks.CAPITALS_TRAIN_TEMPLATES for c in trained}
    held_phrasings = {t.format(country=c) for t in tasks.CAPITALS_HELD_OUT_TEMPLATES for c in held}
    assert {p.question for p in known_train} <= train_phrasings
    assert {p.question for p in known_held_out} <= held_phrasings
    germany = tasks.NamedAnswerProblem(question="Which city is Germany's capital?",
                                       answer="The capital of Germany is Berlin.", name="Berlin")
    # Named in any words counts (the base model answers in its own words); another city does not.
    assert germany.check("Germany's capital is berlin, a large city.") and germany.check(germany.answer)
    assert not germany.check("The capital of Germany is Ostrelle.")
    assert all(isinstance(p, tasks.NamedAnswerProblem) and p.check(p.answer) for p in known_held_out)
    assert task.known_split(0, 8, seed=0)[0] == []
