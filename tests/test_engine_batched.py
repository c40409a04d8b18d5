"""The engine's batched paths agree with their references (fp32, CPU).

* grouped LoRA math (one torch._grouped_mm per factor) == the per-adapter loop;
* adapter offload beyond a resident limit is invisible in the results;
* the sampler's dropping of finished rows changes nothing; its own input checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine.engine import AdapterConfig, Engine, EngineInputError, ForwardItem, ForwardResult
from server.engine.lora import MultiLoRALinear, init_lora_pair
from server.engine.sampler import SampleRequest, generate

from engine_helpers import QWEN, adapter_maker, assert_same_outcomes, grads, layer_with_adapters, random_datum

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]
make_adapter = adapter_maker("b", b_seed_offset=1000)

ADAM = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)


@pytest.fixture(scope="module")
def engine():
    e = Engine(device="cpu")
    e.load_model(QWEN)
    return e


def test_grouped_lora_layer_equals_loop_with_gaps_and_unordered_spans():
    torch.manual_seed(0)
    layer = layer_with_adapters(24, 40, [(2, 4.0), (8, 8.0), (5, 20.0)], seed=1)
    x = torch.randn(2, 15, 24)
    # gaps (base-only tokens), an unordered span list, a slot this layer lacks, an empty span
    cases = [[(0, 0, 4), (1, 4, 9), (2, 9, 30)], [(2, 3, 7), (0, 12, 20), (7, 20, 22), (1, 25, 29), (0, 29, 29)]]
    for spans in cases:
        outs, grad_sets = [], []
        for impl in ("loop", "grouped"):
            layer.impl = impl
            xi = x.clone().requires_grad_(True)
            y = layer.forward_spans(xi, spans)
            y.sum().backward()  # an expanded (stride 0) gradient, which grouped mm must accept
            outs.append(y.detach())
            grad_sets.append([xi.grad] + [t.grad.clone() for p in layer.adapters.values() for t in (p.lora_A, p.lora_B)])
            for p in layer.adapters.values():
                p.lora_A.grad = p.lora_B.grad = None
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        assert (outs[0] != layer.base(x)).any()  # the adapters did something
        for a, b in zip(grad_sets[1], grad_sets[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_segment_function_equals_autograd_of_peft_arithmetic():
    """The loop's one-node training path (_SegmentLoRALinear, hand-written backward) gives
    the output and every gradient that autograd gives for PEFT's own arithmetic, over a
    base with a bias, gaps, unordered spans, a slot used twice, and an input with and
    without a gradient of its own."""
    g = torch.Generator().manual_seed(11)
    base = torch.nn.Linear(24, 40, bias=True).requires_grad_(False)
    layer = MultiLoRALinear(base, "x", "attn")
    layer.impl = "loop"
    for slot, (rank, alpha) in enumerate([(2, 4.0), (8, 8.0), (5, 20.0)]):
        pair = init_lora_pair(24, 40, rank, alpha, g, torch.device("cpu"))
        with torch.no_grad():
            pair.lora_B.normal_(generator=g)
        layer.add_adapter(slot, pair)
    factors = [t for p in layer.adapters.values() for t in (p.lora_A, p.lora_B)]
    x = torch.randn(2, 15, 24, generator=g)
    upstream = torch.randn(2, 15, 40, generator=g)
    spans = [(2, 3, 7), (0, 12, 20), (1, 21, 25), (0, 25, 29)]

    def reference(xi):
        out = base(xi).reshape(-1, 40)
        x_flat = xi.reshape(-1, 24)
        deltas = torch.zeros_like(out)
        for slot, s, e in spans:
            p = layer.adapters[slot]
            deltas = deltas.index_add(0, torch.arange(s, e), (x_flat[s:e] @ p.lora_A.t()) @ p.lora_B.t() * p.scaling)
        return (out + deltas).reshape(2, 15, 40)

    for x_needs_grad in (True, False):
        results = []
        for run in (lambda xi: layer.forward_spans(xi, spans), reference):
            xi = x.clone().requires_grad_(x_needs_grad)
            y = run(xi)
            (y * upstream).sum().backward()
            results.append((y.detach(), xi.grad, [t.grad.clone() for t in factors]))
            if run is not reference:
                assert type(y.grad_fn).__name__ == "_SegmentLoRALinearBackward"  # the one node
            for t in factors:
                t.grad = None
        (y1, gx1, gf1), (y2, gx2, gf2) = results
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
        if x_needs_grad:
            torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
        else:
            assert gx1 is None and gx2 is None
        for a, b in zip(gf1, gf2):
            assert b.abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_picks_the_loop_for_cpu_training_and_grouped_elsewhere():
    aligned = layer_with_adapters(24, 40, [(2, 4.0)], seed=4)
    odd = layer_with_adapters(24, 41, [(2, 4.0)], seed=4)  # 41 floats: rows not 16-byte aligned
    x = torch.randn(3, 24)
    for layer in (aligned, odd):
        layer.impl = "auto"
    assert aligned.pass_impl(x) == "loop"  # gradients on a CPU: one autograd node per layer
    with torch.no_grad():
        assert aligned.pass_impl(x) == "grouped"  # a decode step: segment-batched bmm
        assert odd.pass_impl(x) == "loop"  # what grouped GEMM cannot take loops
    aligned.impl = "grouped"
    assert aligned.pass_impl(x) == "grouped"  # an explicit choice holds


def test_segment_bmm_path_without_gradients_equals_loop(monkeypatch):
    """Without gradients, the grouped impl takes batched matmuls over a [segments, largest
    segment] layout (up to a size); beyond it the grouped kernel. Both equal the loop: with
    equal segments added in place into the base output (a view), with unequal ones padded
    and the padding dropped, and with gaps or unordered spans gathered."""
    from server.engine import lora, lora_decode

    layer = layer_with_adapters(24, 40, [(2, 4.0), (8, 8.0), (5, 20.0)], seed=2)
    x = torch.randn(2, 15, 24, generator=torch.Generator().manual_seed(3))
    cases = [[(0, 0, 5), (1, 5, 10), (2, 10, 15)],  # equal and contiguous: a view, in place
             [(0, 0, 4), (1, 4, 9), (2, 9, 30)],  # contiguous, unequal: padded
             [(2, 3, 7), (0, 12, 20), (7, 20, 22), (1, 25, 29), (1, 29, 30)]]  # gathered, a slot twice
    calls = []
    original = lora_decode.SegmentBmm.add
    monkeypatch.setattr(lora_decode.SegmentBmm, "add",
                        lambda self, *args: calls.append(1) or original(self, *args))
    for spans in cases:
        with torch.no_grad():
            layer.impl = "loop"
            expected = layer.forward_spans(x, spans)
            layer.impl = "grouped"
            for limit, bmm in ((10**6, True), (0, False)):
                before = len(calls)
                monkeypatch.setattr(lora_decode, "SEGMENT_BMM_MAX_TOKENS", limit)
                # limit 0 on CPU: only passes whose padding at most doubles the rows stay on bmm
                got = layer.forward_spans(x, spans)
                plan = lora.make_route_plan([s for s in spans if s[0] in layer.adapters], x.device)
                assert (len(calls) > before) == (bmm or plan.padded_tokens <= 2 * sum(plan.sizes))
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert (expected != layer.base(x)).any()


def test_segment_layout_pads_each_segment_with_its_own_tokens():
    from server.engine.lora import make_route_plan

    plan = make_route_plan([(4, 0, 3), (1, 3, 4), (9, 4, 6)], torch.device("cpu"))
    assert plan.sizes == (3, 1, 2) and plan.padded_tokens == 9
    gather, keep = plan.segment_layout()
    assert gather.tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 4]
    assert keep.tolist() == [0, 1, 2, 3, 6, 7]
    assert make_route_plan([(4, 0, 2), (1, 2, 4)], torch.device("cpu")).segment_layout() == (None, None)


def test_grouped_engine_pass_equals_loop_pass(engine):
    rng = np.random.default_rng(0)
    adapters = [
        make_adapter(engine, rank=2, seed=1, train_mlp=False),
        make_adapter(engine, rank=8, alpha=4.0, seed=2),
        make_adapter(engine, rank=4, seed=3, train_attn=False, train_unembed=False),
    ]
    items = [ForwardItem(aid, [random_datum(rng, n) for n in (7, 12)]) for aid, _ in adapters]
    results = {}
    for impl in ("loop", "grouped"):
        engine.set_lora_impl(impl)
        res = engine.forward(items, backward=True)
        results[impl] = (res, [grads(ad) for _, ad in adapters])
        for _, ad in adapters:
            ad.optimizer.zero_grad()
    engine.set_lora_impl("auto")
    assert_same_outcomes(results["grouped"], results["loop"])


def test_grouped_sampling_equals_loop_sampling(engine):
    (_, ad_a), (_, ad_b) = make_adapter(engine, rank=4, seed=7), make_adapter(engine, rank=2, seed=8)
    reqs = [
        SampleRequest(ad_a.slot, [5, 6, 7], 2, 6, temperature=1.0, seed=1),
        SampleRequest(None, [9, 10], 1, 6, temperature=0.0),
        SampleRequest(ad_b.slot, [11, 12, 13, 14], 2, 6, temperature=0.7, seed=2),
    ]
    outs = {}
    for impl in ("loop", "grouped"):
        engine.set_lora_impl(impl)
        outs[impl] = engine.sample(QWEN, reqs)
    engine.set_lora_impl("auto")
    for ra, rb in zip(outs["grouped"], outs["loop"]):
        for a, b in zip(ra, rb):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- offload


def train_round_robin(engine, steps):
    rng = np.random.default_rng(5)
    ids = []
    for k in range(4):
        aid = f"rr-{k}"
        engine.create_adapter(aid, QWEN, AdapterConfig(rank=4, seed=40 + k))
        ids.append(aid)
    for _ in range(steps):
        for aid in ids:
            (res,) = engine.forward([ForwardItem(aid, [random_datum(rng, 9), random_datum(rng, 6)])], backward=True)
            assert isinstance(res, ForwardResult)
            engine.optim_step(aid, ADAM)
    # one shared pass of all four: more than the limit must still work (all resident for it)
    items = [ForwardItem(aid, [random_datum(rng, 5)]) for aid in ids]
    assert all(isinstance(r, ForwardResult) for r in engine.forward(items, backward=True))
    for aid in ids:
        engine.optim_step(aid, ADAM)
    return ids


def test_offload_beyond_resident_limit_is_invisible(engine):
    limited = Engine(device="cpu", max_resident_adapters=2)
    ids = train_round_robin(limited, steps=3)
    reference = Engine(device="cpu")
    train_round_robin(reference, steps=3)
    assert limited.offload_count > 0 and limited.restore_count > 0
    assert reference.offload_count == 0
    assert len(limited.resident_adapters()) == 2  # the limit, filled by the last two used
    for aid in ids:
        got, want = limited.export_adapter(aid)[0], reference.export_adapter(aid)[0]
        for key in want:
            assert torch.equal(got[key], want[key]), key
        opt_got = limited.optimizer_state(aid)["optimizer"]["state"]
        opt_want = reference.optimizer_state(aid)["optimizer"]["state"]
        for k in opt_want:
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_got[k][moment], opt_want[k][moment]), (aid, k, moment)
    assert len(limited.resident_adapters()) <= 2

    before = limited.offload_count
    aid = limited.resident_adapters()[-1]
    limited.park(aid)
    assert aid not in limited.resident_adapters() and limited.offload_count == before + 1
    restores = limited.restore_count
    rng = np.random.default_rng(9)
    item = ForwardItem(aid, [random_datum(rng, 6)])
    lp_parked = limited.forward([item], backward=False)[0].logprobs[0]
    assert limited.restore_count == restores + 1 and aid in limited.resident_adapters()
    np.testing.assert_array_equal(lp_parked, reference.forward([item], backward=False)[0].logprobs[0])


# ------------------------------------------------------------------------------- sampler


def test_dropping_finished_rows_changes_nothing(engine):
    aid, ad = make_adapter(engine, rank=4, seed=21)
    base = engine.bases[QWEN]
    # Stop tokens that are common under this random model make rows stop at mixed lengths.
    probe = engine.sample(QWEN, [SampleRequest(ad.slot, [1, 2, 3], 6, 12, temperature=1.0, seed=3)])[0]
    common = sorted({t for o in probe for t in o.tokens[:4]})[:6]
    reqs = [
        SampleRequest(ad.slot, [1, 2, 3], 6, 12, temperature=1.0, seed=3, stop_token_ids=common),
        SampleRequest(None, [4, 5], 3, 9, temperature=0.0),
        SampleRequest(ad.slot, [6, 7, 8, 9], 3, 5, temperature=0.8, top_k=50, seed=4),
    ]
    compact = generate(base, reqs, compact=True)
    full = generate(base, reqs, compact=False)
    lengths = {len(o.tokens) for r in compact for o in r}
    assert len(lengths) >= 3, lengths  # the case really mixes stop lengths
    assert any(o.stop_reason == "stop" for o in compact[0])
    for rc, rf in zip(compact, full):
        for a, b in zip(rc, rf):
            assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("req,where", [
    (SampleRequest(None, list(range(2000)), 1, 49), "requests[1].sampling_params.max_tokens"),
    (SampleRequest(None, [], 1, 4), "requests[1].prompt"),
    (SampleRequest(None, [1, 4096], 1, 4), "requests[1].prompt"),
    (SampleRequest(None, [1, 2], 1, 0), "requests[1].sampling_params.max_tokens"),
    (SampleRequest(12345, [1, 2], 1, 4), "requests[1].model_id"),
])
def test_sample_rejects_bad_requests_before_compute(engine, req, where):
    good = SampleRequest(None, [1, 2, 3], 1, 4)
    with pytest.raises(EngineInputError) as info:
        engine.sample(QWEN, [good, req])
    assert info.value.where == where
    # the limit is inclusive: prompt + max_tokens == context is fine
    assert len(engine.sample(QWEN, [SampleRequest(None, [1] * 2046, 1, 2, temperature=0.0)])[0][0].tokens) == 2


def test_choose_draws_from_each_rows_own_filtered_distribution():
    """One batched draw for rows of different requests (temperature, top_k, top_p, greedy):
    each request's samples land only in its allowed set, with its renormalised frequencies."""
    from server.engine.sampler import RowSampling, _choose

    vocab, n = 12, 6000
    logits_row = torch.linspace(2.0, -2.0, vocab)  # token 0 most likely
    probs = torch.softmax(logits_row, -1)
    specs = [dict(temperature=1.0), dict(temperature=0.5, top_k=3), dict(temperature=1.0, top_p=0.5),
             dict(temperature=0.0)]
    requests = [SampleRequest(None, [1], n, 1, seed=10 + i, **spec) for i, spec in enumerate(specs)]
    rows = [(r, s) for r in range(len(requests)) for s in range(n)]
    generators = {r: torch.Generator().manual_seed(req.seed) for r, req in enumerate(requests)}
    sampling = RowSampling.of(rows, requests, vocab, torch.device("cpu"))
    tokens = _choose(logits_row.expand(len(rows), vocab).clone(), sampling, requests, generators)
    counts = [torch.bincount(tokens[r * n:(r + 1) * n], minlength=vocab).double() / n for r in range(len(specs))]

    def expect(p):
        return p / p.sum()

    tempered = torch.softmax(logits_row / 0.5, -1)
    nucleus = (torch.cumsum(probs, -1) - probs) < 0.5  # the tokens before which < half the mass lies
    expected = [probs.double(), expect(torch.where(torch.arange(vocab) < 3, tempered, 0)).double(),
                expect(torch.where(nucleus, probs, 0)).double(), torch.eye(vocab)[0].double()]
    for got, want in zip(counts, expected):
        assert (got[want == 0] == 0).all(), (got, want)  # never outside the allowed set
        assert float((got - want).abs().max()) < 0.03, (got, want)  # ~4 sigma at n = 6000
    # the same seeds give the same draws
    again = _choose(logits_row.expand(len(rows), vocab).clone(), sampling, requests,
                    {r: torch.Generator().manual_seed(req.seed) for r, req in enumerate(requests)})
    assert torch.equal(tokens, again)


def test_filter_leaves_rows_without_a_nucleus_whole_beside_rows_with_one():
    """A row with top_p = 1 (and no top_k) keeps every token even when a co-tenant's row in
    the same batched draw asks for a nucleus: a float32 cumsum overshoots 1 in the tail, which
    must not cut tokens from rows that asked for no cut."""
    from server.engine.sampler import RowSampling, _filter

    vocab = 1000
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3)) * 3
    probs = torch.softmax(torch.sort(logits[1], descending=True).values, -1)
    assert float((torch.cumsum(probs, -1) - probs).max()) > 1.0  # the overshoot is there
    requests = [SampleRequest(None, [1], 1, 1, top_p=0.5), SampleRequest(None, [1], 1, 1, top_p=1.0)]
    out = _filter(logits.clone(), RowSampling.of([(0, 0), (1, 0)], requests, vocab, torch.device("cpu")))
    assert torch.equal(out[1], logits[1])
    assert torch.isinf(out[0]).any()  # the nucleus row is cut


# ------------------------------------------------------------------- decode-step machinery


def test_shared_input_siblings_equal_each_alone_and_never_reuse_another_input():
    """q/k/v (one input tensor) take x @ A from one matmul of all three side by side; each
    equals its own product, and a cached product is reused only for the very same,
    unmodified tensor: not for an equal-shaped new one (the next step) nor after an
    in-place change, nor across passes."""
    from server.engine import lora_decode
    from server.engine.lora import LoRARouting, spans_for_rows

    g = torch.Generator().manual_seed(4)
    layers = {}
    for leaf, out in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16)):
        layer = layer_with_adapters(24, out, [(4, 8.0), (2, 2.0)], seed=len(layers) + 10)
        layer.name = f"attn.{leaf}"
        layers[layer.name] = layer
    routing = LoRARouting(layers, spans_for_rows([0, 0, 1, None, 1]), per_row=True)
    xs = [torch.randn(5, 1, 24, generator=g) for _ in range(3)]

    def alone(layer, x):  # with gradients on (the loop): no sharing, no preparing
        with torch.enable_grad():
            return layer.forward_spans(x, [(0, 0, 2), (1, 2, 3), (1, 4, 5)]).detach()

    with torch.no_grad():
        for step, x in enumerate(xs):
            with routing:
                got = {name: layer(x) for name, layer in layers.items()}
            for name, layer in layers.items():
                torch.testing.assert_close(got[name], alone(layer, x), rtol=1e-6, atol=1e-6)
            assert all(isinstance(p, lora_decode.SegmentBmm) and p.shared for p in routing.prepared.values())
            assert routing.shared_h == {}  # a pass's inputs are dropped when it ends
        with routing:  # within one pass: a new tensor, then the same one changed in place
            layers["attn.q_proj"](xs[0])
            fresh = xs[0].clone() * 2
            torch.testing.assert_close(layers["attn.k_proj"](fresh), alone(layers["attn.k_proj"], fresh))
            fresh.mul_(-1)
            torch.testing.assert_close(layers["attn.v_proj"](fresh), alone(layers["attn.v_proj"], fresh))


def test_routing_drops_prepared_work_when_spans_change():
    from server.engine.lora import LoRARouting, spans_for_rows

    layer = layer_with_adapters(24, 40, [(4, 8.0), (2, 2.0)], seed=6)
    routing = LoRARouting({"x": layer}, spans_for_rows([0, 0, 1, 1]), per_row=True)
    x = torch.randn(4, 1, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with routing:
            layer(x)
        routing.spans = tuple(spans_for_rows([1, 1, 0, 0]))  # as the sampler does on compaction
        assert routing.prepared == {}
        with routing:
            got = layer(x)
        expected = layer.forward_spans(x, [(1, 0, 2), (0, 2, 4)])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)



def test_a_prompt_prefilled_once_for_all_its_samples_samples_the_same(engine):
    """share_prefill runs each request's prompt once and copies its KV cache to its samples'
    rows: the same tokens and logprobs as prefilling every sample's row, across adapters,
    prompt lengths, sample counts and sampling settings."""
    (_, ad_a), (_, ad_b) = make_adapter(engine, rank=4, seed=31), make_adapter(engine, rank=8, seed=32)
    base = engine.bases[QWEN]
    reqs = [
        SampleRequest(ad_a.slot, [5, 6, 7], 4, 7, temperature=1.0, seed=1),
        SampleRequest(None, [9, 10], 1, 5, temperature=0.0),
        SampleRequest(ad_b.slot, [11, 12, 13, 14, 15], 3, 6, temperature=0.7, top_p=0.9, seed=2),
        SampleRequest(ad_a.slot, [3, 1], 2, 4, temperature=0.0),
    ]
    shared = generate(base, reqs, share_prefill=True)
    alone = generate(base, reqs, share_prefill=False)
    for rs, ra in zip(shared, alone):
        assert len(rs) == len(ra)
        for a, b in zip(rs, ra):
            assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
    assert len({tuple(o.tokens) for o in shared[0]}) > 1  # the samples really differ
