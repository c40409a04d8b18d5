"""Packed rows and attention paths (fp32, CPU unless noted).

* the planner: first-fit-decreasing rows, the R * L budget, padding owned by no adapter;
* padded multi-row layout == the one-long-row layout (logprobs and gradients);
* FlexAttention with a document BlockMask == the explicit 4D sdpa mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine.engine import Engine, ForwardItem, ForwardResult
from server.engine.packing import build_micro_batch, plan_micro_batches

from engine_helpers import QWEN, adapter_maker, assert_same_outcomes, random_datum

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]
make_adapter = adapter_maker("p", b_seed_offset=500)


@pytest.fixture(scope="module")
def engine():
    e = Engine(device="cpu", attention="sdpa_mask")
    e.load_model(QWEN)
    return e


def test_planner_packs_rows_under_the_budget():
    lengths = [30, 7, 12, 30, 5, 18, 9, 3]
    slots = [2, 0, 1, None, 0, 2, 1, 0]
    plan = plan_micro_batches(lengths, slots, token_budget=64)
    rows = [row for batch in plan for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each exactly once
    for batch in plan:  # L = 30 (the longest), so at most 2 rows per micro-batch
        assert len(batch) * 30 <= 64
        assert all(sum(lengths[i] for i in row) <= 30 for row in batch)
    # first-fit-decreasing fills rows: 114 tokens fit in 4 rows of 30, not one row each
    assert len(rows) == 4
    # a configured row length packs more per row; a budget smaller than a row still progresses
    assert len([r for b in plan_micro_batches(lengths, slots, 120, row_length=60) for r in b]) == 2
    assert [len(b) for b in plan_micro_batches(lengths, slots, 10)] == [1] * 4

    tokens = [list(range(100, 100 + n)) for n in lengths]
    batch = build_micro_batch(rows, tokens, slots, torch.device("cpu"), pad_id=1)
    flat_ids, docs = batch.input_ids.reshape(-1), batch.doc_ids.reshape(-1)
    assert batch.num_tokens == sum(lengths) and batch.row_tokens == 4 * 30
    padding = docs == -1
    assert int(padding.sum()) == 4 * 30 - sum(lengths) and (flat_ids[padding] == 1).all()
    covered = torch.zeros_like(padding)
    for slot, s, e in batch.spans:  # routing never touches padding or base-only sequences
        covered[s:e] = True
    for seq in batch.sequences:
        pos = torch.arange(seq.flat_start, seq.flat_start + seq.length)
        assert flat_ids[pos].tolist() == tokens[seq.key]
        assert batch.position_ids.reshape(-1)[pos].tolist() == list(range(seq.length))
        assert bool(covered[pos].all()) == (seq.slot is not None)
        assert batch.token_index[seq.start:seq.start + seq.length].tolist() == pos.tolist()
    assert not covered[padding].any()


def _run(engine, items, backward, **settings):
    old = {name: getattr(engine, name) for name in settings}
    for name, value in settings.items():
        setattr(engine, name, value)
    try:
        results = engine.forward(items, backward=backward)
    finally:
        for name, value in old.items():
            setattr(engine, name, value)
    assert all(isinstance(r, ForwardResult) for r in results), results
    return results


def test_padded_rows_equal_one_row_layout(engine):
    rng = np.random.default_rng(7)
    adapters = [
        make_adapter(engine, rank=4, seed=1, train_mlp=False),
        make_adapter(engine, rank=8, alpha=16.0, seed=2),
        make_adapter(engine, rank=2, seed=3, train_attn=False),
    ]
    lengths = [[21, 6, 13], [9, 21, 4], [17, 11]]
    items = [ForwardItem(aid, [random_datum(rng, n) for n in ns]) for (aid, _), ns in zip(adapters, lengths)]
    all_lengths = [n for ns in lengths for n in ns]
    slots = [ad.slot for (_, ad), ns in zip(adapters, lengths) for _ in ns]
    # the default layout really is several padded rows; the reference really is one row
    rows = [r for b in plan_micro_batches(all_lengths, slots, 4096) for r in b]
    assert 1 < len(rows) and len(rows) * max(all_lengths) > sum(all_lengths)
    assert len(plan_micro_batches(all_lengths, slots, 4096, row_length=4096)[0]) == 1

    outcomes = []
    for row_length in (None, 4096):
        results = _run(engine, items, True, row_length=row_length)
        outcomes.append((results, [[p.grad.clone() for p in ad.parameters()] for _, ad in adapters]))
        for _, ad in adapters:
            ad.optimizer.zero_grad()
    assert_same_outcomes(*outcomes)


def test_one_sequence_per_row_takes_plain_causal_attention_and_equals_one_row(engine, monkeypatch):
    """Rows that each hold one sequence (right-padded) need no document mask: the pass
    hands the model no mask at all (its causal kernel), with the same results."""
    from server.engine import engine as engine_module

    rng = np.random.default_rng(9)
    adapters = [make_adapter(engine, rank=4, seed=21), make_adapter(engine, rank=8, seed=22)]
    items = [ForwardItem(adapters[0][0], [random_datum(rng, 10), random_datum(rng, 8)]),
             ForwardItem(adapters[1][0], [random_datum(rng, 9), random_datum(rng, 7)])]
    masks_built = []
    real_mask = engine_module.sdpa_document_mask
    monkeypatch.setattr(engine_module, "sdpa_document_mask",
                        lambda *a: masks_built.append(1) or real_mask(*a))
    outcomes = []
    for row_length in (None, 4096):  # rows of 10 (no two fit), then one row with a mask
        results = _run(engine, items, True, row_length=row_length)
        outcomes.append((results, [[p.grad.clone() for p in ad.parameters()] for _, ad in adapters]))
        for _, ad in adapters:
            ad.optimizer.zero_grad()
        assert len(masks_built) == (0 if row_length is None else 1)
    assert_same_outcomes(*outcomes)


def test_flex_attention_equals_sdpa_mask(engine):
    pytest.importorskip("torch.nn.attention.flex_attention")
    rng = np.random.default_rng(8)
    adapters = [make_adapter(engine, rank=4, seed=11), make_adapter(engine, rank=8, seed=12, train_mlp=False)]
    items = [
        ForwardItem(adapters[0][0], [random_datum(rng, n) for n in (19, 5, 8)]),
        ForwardItem(adapters[1][0], [random_datum(rng, n) for n in (12, 7)]),
    ]
    # several sequences per row, padding, and two micro-batches
    sdpa = _run(engine, items, False, row_length=24, token_budget=48)
    flex = _run(engine, items, False, row_length=24, token_budget=48, attention="flex")
    for a, b in zip(flex, sdpa):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            np.testing.assert_allclose(lp_a, lp_b, rtol=0, atol=1e-5)
    if engine.device.type == "cpu":  # torch 2.13 has no FlexAttention backward on CPU
        with pytest.raises(ValueError, match="no backward on CPU"):
            _run(engine, items, True, attention="flex")
    assert engine.attention == "sdpa_mask"  # _run restored it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA in torch 2.13")
def test_flex_attention_gradients_equal_sdpa_mask_on_cuda():
    e = Engine(device="cuda", attention="flex")
    e.load_model(QWEN)
    rng = np.random.default_rng(9)
    aid, ad = make_adapter(e, rank=4, seed=21)
    items = [ForwardItem(aid, [random_datum(rng, n) for n in (40, 9, 17)])]
    outcomes = []
    for attention in ("flex", "sdpa_mask"):
        res = _run(e, items, True, attention=attention)
        outcomes.append((res, [p.grad.clone() for p in ad.parameters()]))
        ad.optimizer.zero_grad()
    (flex_res, flex_grads), (sdpa_res, sdpa_grads) = outcomes
    for lp_a, lp_b in zip(flex_res[0].logprobs, sdpa_res[0].logprobs):  # bf16: loose
        np.testing.assert_allclose(lp_a, lp_b, rtol=0, atol=5e-2)
    for a, b in zip(flex_grads, sdpa_grads):
        assert float((a - b).float().norm() / b.float().norm()) <= 5e-2
