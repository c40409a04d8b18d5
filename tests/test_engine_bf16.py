"""The engine's reduced-precision path: a bf16 base with fp32 LoRA masters, run on CPU.

On CUDA the engine runs the frozen base in bf16 (models.default_dtype); every other engine
test runs fp32 on CPU. Here the same tiny model is loaded twice, fp32 and bf16 (CPU torch
has bf16 matmul, sdpa and torch._grouped_mm), with identical adapters, and the bf16 engine
is checked against the fp32 one, against an fp64 reference, and against itself.

Tolerances. bf16 keeps 8 significant bits: unit roundoff u = 2^-8 ~ 0.0039. Every layer
rounds its activations to bf16, so a logprob of magnitude ~8 (log of the 4096-token vocab)
is off by order u * |lp| ~ 0.03 nats: measured max 0.023 (mean 0.008) against fp32 here.
Logprob bounds are 0.05 nats per token (twice the worst measurement) and 0.02 for the mean;
a lost LoRA scaling or a row routed to the wrong adapter fails them (tried by mutation).
Gradients, whose elements are sums of many rounded products, are compared by direction
(cosine > 0.99 per tensor; worst measured 0.997) and by relative norm error (< 0.15, what
cosine 0.99 allows at equal norms; worst measured 0.08).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import save_file

from server.engine.engine import AdapterConfig, Engine, EngineDatum, ForwardItem, ForwardResult
from server.engine.models import load_base_model
from server.engine.sampler import SampleRequest
from server.tiny import build_tiny_model
from engine_helpers import grads, layer_with_adapters

pytestmark = [
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

QWEN = "tiny-qwen3"
LP_MAX, LP_MEAN = 0.05, 0.02  # nats, see the module docstring
ADAM = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
_ids = itertools.count()


@pytest.fixture(scope="module")
def engines():
    """{"fp32": engine, "bf16": engine}, each with tiny-qwen3 on CPU in that dtype."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        e = Engine(device="cpu")
        e.register_model(load_base_model(QWEN, e.device, dtype))
        out[name] = e
    return out


def twin_adapters(engines, **cfg):
    """The same adapter (same init seed, same random lora_B) in both engines; returns its id.

    PEFT init has B = 0, which would make the adapters inert and lora_A's grads 0.
    """
    aid = f"bf-{next(_ids)}"
    for e in engines.values():
        ad = e.create_adapter(aid, QWEN, AdapterConfig(**cfg))
        g = torch.Generator().manual_seed(cfg.get("seed", 0) + 500)
        with torch.no_grad():
            for pair in ad.pairs.values():
                pair.lora_B.copy_(torch.randn(pair.lora_B.shape, generator=g) * 0.05)
    return aid


def datum(tokens, weights=None):
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    return EngineDatum(tokens[:-1].copy(), {"target_tokens": tokens[1:].copy(), "weights": w})


def rand_data(seed, lengths):
    rng = np.random.default_rng(seed)
    return [datum(rng.integers(0, 4000, n + 1)) for n in lengths]


def run(engine, items, backward):
    results = engine.forward(items, backward=backward)
    for r in results:
        assert isinstance(r, ForwardResult), f"expected a result, got {r!r}"
    return results


def assert_lp_close(actual, expected, where=""):
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    assert np.isfinite(diff).all(), where
    assert diff.max() <= LP_MAX, f"{where}: max |dlogprob| {diff.max():.4f} > {LP_MAX}"
    assert diff.mean() <= LP_MEAN, f"{where}: mean |dlogprob| {diff.mean():.4f} > {LP_MEAN}"


def assert_grads_close(actual: list, expected: list, cos_min=0.99, rel_max=0.15):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        assert b.norm() > 0, "zero reference gradient (weak test)"
        cos = float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))
        rel = float((a.double() - b.double()).norm() / b.double().norm())
        assert cos > cos_min and rel < rel_max, f"gradient cosine {cos:.5f}, relative error {rel:.4f}"


# -------------------------------------------------------------------------------- tests


def test_bf16_engine_runs_a_bf16_base_with_fp32_lora_masters(engines):
    e = engines["bf16"]
    base = e.bases[QWEN]
    assert base.dtype == torch.bfloat16
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    aid = twin_adapters(engines, rank=8, seed=1)
    ad = e.adapters[aid]
    assert ad.parameters() and all(t.dtype == torch.float32 for t in ad.parameters())


def test_forward_backward_logprobs_and_grads_match_fp32(engines):
    """Two adapters of different ranks (4 is padded to 8 in bf16's grouped stacks) and an
    alpha/rank scaling that is not a power of two, trained together in one packed pass."""
    a1 = twin_adapters(engines, rank=8, alpha=24.0, seed=2)
    a2 = twin_adapters(engines, rank=4, seed=3, train_mlp=False)
    items = [ForwardItem(a1, rand_data(10, (20, 33))), ForwardItem(a2, rand_data(11, (7, 15)))]
    out = {name: run(e, items, backward=True) for name, e in engines.items()}
    for k, (r32, r16) in enumerate(zip(out["fp32"], out["bf16"])):
        loss32, loss16 = r32.metrics["loss:sum"], r16.metrics["loss:sum"]
        assert np.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=1e-3)
        for d, (lp32, lp16) in enumerate(zip(r32.logprobs, r16.logprobs)):
            assert lp16.dtype == np.float32 and lp16.shape == lp32.shape
            assert_lp_close(lp16, lp32, f"item {k} datum {d}")
    for aid in (a1, a2):
        g16 = grads(engines["bf16"].adapters[aid])
        assert all(g.dtype == torch.float32 for g in g16)  # the cast's backward lands in fp32
        assert_grads_close(g16, grads(engines["fp32"].adapters[aid]))
        for e in engines.values():
            e.adapters[aid].optimizer.zero_grad()


def test_grouped_layer_equals_loop_and_fp64_reference_in_bf16():
    """One bf16 layer, adapters of ranks 2/8/5 (padded in the grouped stacks), gaps and an
    unordered span list (the gather / index_add path): both impls against fp64 math."""
    torch.manual_seed(0)
    layer = layer_with_adapters(32, 48, [(2, 4.0), (8, 8.0), (5, 15.0)], seed=1, dtype=torch.bfloat16)
    base = layer.base
    x = torch.randn(2, 15, 32).to(torch.bfloat16)
    w = torch.randn(2, 15, 48, dtype=torch.float64)  # a non-uniform upstream gradient
    cases = [[(0, 0, 4), (1, 4, 9), (2, 9, 30)], [(2, 3, 7), (0, 12, 20), (7, 20, 22), (1, 25, 29)]]
    for spans in cases:
        # fp64 reference from the same (bf16-rounded) input and base weight, fp32 masters.
        x64 = x.double().reshape(-1, 32)
        ref = x64 @ base.weight.double().t()
        ref_grads = []
        for slot, s, e in spans:
            if slot in layer.adapters:
                p = layer.adapters[slot]
                a64 = p.lora_A.detach().double().requires_grad_(True)
                b64 = p.lora_B.detach().double().requires_grad_(True)
                delta = (x64[s:e] @ a64.t()) @ b64.t() * p.scaling
                ref = ref.index_add(0, torch.arange(s, e), delta)
                ref_grads.append((slot, a64, b64, delta))
        ref_loss = (ref * w.reshape(-1, 48)).sum()
        ref_loss.backward()
        for impl in ("loop", "grouped"):
            layer.impl = impl
            y = layer.forward_spans(x, spans)
            assert y.dtype == torch.bfloat16
            rel = float((y.detach().double().reshape(-1, 48) - ref.detach()).norm() / ref.detach().norm())
            assert rel < 1e-2, f"{impl}: output relative error {rel:.4f}"
            (y.double() * w).sum().backward()
            for slot, a64, b64, _ in ref_grads:
                pair = layer.adapters[slot]
                assert pair.lora_A.grad.dtype == torch.float32
                assert_grads_close([pair.lora_A.grad, pair.lora_B.grad], [a64.grad, b64.grad],
                                   cos_min=0.999, rel_max=2e-2)
            for p in layer.adapters.values():
                p.lora_A.grad = p.lora_B.grad = None


def test_grouped_engine_pass_equals_loop_pass_in_bf16(engines):
    e = engines["bf16"]
    a1 = twin_adapters(engines, rank=2, seed=4, train_mlp=False)
    a2 = twin_adapters(engines, rank=8, alpha=12.0, seed=5)
    items = [ForwardItem(a1, rand_data(12, (9, 14))), ForwardItem(a2, rand_data(13, (11,)))]
    results = {}
    try:
        for impl in ("loop", "grouped"):
            e.set_lora_impl(impl)
            res = run(e, items, backward=True)
            results[impl] = (res, [grads(e.adapters[a]) for a in (a1, a2)])
            for a in (a1, a2):
                e.adapters[a].optimizer.zero_grad()
    finally:
        e.set_lora_impl("auto")
    (loop_res, loop_grads), (grp_res, grp_grads) = results["loop"], results["grouped"]
    for a, b in zip(grp_res, loop_res):
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert_lp_close(lp_a, lp_b, "grouped vs loop")
    for ga, gb in zip(grp_grads, loop_grads):
        assert_grads_close(ga, gb)


@pytest.mark.filterwarnings("ignore::UserWarning")  # FlexAttention runs unfused on CPU
def test_packed_rows_and_flex_attention_in_bf16_match_fp32(engines):
    """The CUDA default is flex attention on a bf16 base; CPU runs it forward-only. Several
    sequences per padded row, two micro-batches, the bf16 sdpa mask (dtype-min entries) and
    flex all agree with the fp32 engine's one-row-per-sequence layout; each sequence packed
    with others equals itself alone."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    e = engines["bf16"]
    a1 = twin_adapters(engines, rank=4, seed=10)
    a2 = twin_adapters(engines, rank=8, seed=11, train_mlp=False)
    items = [ForwardItem(a1, rand_data(18, (19, 5, 8))), ForwardItem(a2, rand_data(19, (12, 7)))]
    reference = run(engines["fp32"], items, backward=False)
    settings = [dict(attention="sdpa_mask"), dict(attention="sdpa_mask", row_length=24, token_budget=48),
                dict(attention="flex", row_length=24, token_budget=48)]
    saved = {name: getattr(e, name) for name in ("attention", "row_length", "token_budget")}
    try:
        for setting in settings:
            for name, value in setting.items():
                setattr(e, name, value)
            for a, b in zip(run(e, items, backward=False), reference):
                for lp_a, lp_b in zip(a.logprobs, b.logprobs):
                    assert_lp_close(lp_a, lp_b, str(setting))
    finally:
        for name, value in saved.items():
            setattr(e, name, value)
    alone = run(e, [ForwardItem(a1, items[0].data[:1])], backward=False)[0].logprobs[0]
    packed = run(e, items, backward=False)[0].logprobs[0]
    assert_lp_close(packed, alone, "packed vs alone")


def test_overfit_loss_drops_in_bf16_as_in_fp32_and_state_stays_fp32(engines):
    aid = twin_adapters(engines, rank=8, seed=6)
    batch = [ForwardItem(aid, rand_data(14, (16, 12)))]
    curves = {}
    for name, e in engines.items():
        curve = []
        for _ in range(6):
            curve.append(run(e, batch, backward=True)[0].metrics["loss:sum"])
            e.optim_step(aid, ADAM)
        curve.append(run(e, batch, backward=False)[0].metrics["loss:sum"])
        curves[name] = np.asarray(curve)
    c32, c16 = curves["fp32"], curves["bf16"]
    assert np.isfinite(c16).all()
    assert c32[-1] < 0.7 * c32[0]  # the batch is learnable at this rate
    assert c16[-1] < 0.7 * c16[0]
    # The bf16 run follows the fp32 one at every step (measured within 2.4%).
    np.testing.assert_allclose(c16, c32, rtol=0.08)
    ad = engines["bf16"].adapters[aid]
    assert all(t.dtype == torch.float32 for t in ad.parameters())
    state = ad.optimizer.optimizer.state
    assert len(state) == len(ad.parameters())
    for s in state.values():
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
    # The trained weights moved the same way in both engines.
    w16 = torch.cat([t.detach().flatten() for t in ad.parameters()])
    w32 = torch.cat([t.detach().flatten() for t in engines["fp32"].adapters[aid].parameters()])
    assert float(torch.nn.functional.cosine_similarity(w16, w32, dim=0)) > 0.99


def test_bf16_sampling_with_several_adapters_matches_forward_logprobs(engines):
    e = engines["bf16"]
    a1 = twin_adapters(engines, rank=8, seed=7)
    a2 = twin_adapters(engines, rank=4, seed=8, train_attn=False)
    rng = np.random.default_rng(15)
    prompt = rng.integers(0, 4000, 6).tolist()
    slot = {aid: e.adapters[aid].slot for aid in (a1, a2)}
    reqs = [
        (a1, SampleRequest(slot=slot[a1], prompt=prompt, num_samples=2, max_tokens=6, seed=1)),
        (a2, SampleRequest(slot=slot[a2], prompt=prompt[:3], num_samples=2, max_tokens=6, seed=2,
                           temperature=0.8, top_k=100)),
        (None, SampleRequest(slot=None, prompt=prompt[2:], num_samples=1, max_tokens=6, seed=3)),
    ]
    outs = e.sample(QWEN, [r for _, r in reqs])
    seen = set()
    for (owner, req), samples in zip(reqs, outs):
        assert len(samples) == req.num_samples
        for s in samples:
            assert len(s.tokens) == len(s.logprobs) == req.max_tokens
            assert np.isfinite(s.logprobs).all()
            seen.add(tuple(s.tokens))
            seq = np.asarray(req.prompt + s.tokens)
            for name, eng in engines.items():  # the bf16 forward, and the fp32 one
                pl = eng.prompt_logprobs(QWEN, [(owner, seq)])[0]
                assert isinstance(pl, list) and pl[0] is None, pl
                assert_lp_close(s.logprobs, pl[len(req.prompt):], f"{name} forward, adapter {owner}")
    assert len(seen) == 5  # rows of different requests and seeds differ


def test_bf16_trained_adapter_exports_fp32_and_loads_into_peft(engines, tmp_path):
    e = engines["bf16"]
    aid = twin_adapters(engines, rank=8, alpha=16.0, seed=9)
    train = [ForwardItem(aid, rand_data(16, (12, 9)))]
    for _ in range(3):
        run(e, train, backward=True)
        e.optim_step(aid, ADAM)
    tensors, config = e.export_adapter(aid)
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    evals = rand_data(17, (7, 15))
    mine = run(e, [ForwardItem(aid, evals)], backward=False)[0].logprobs
    for dtype in (torch.bfloat16, torch.float32):
        pm = peft.PeftModel.from_pretrained(build_tiny_model(QWEN, dtype=dtype), str(tmp_path))
        pm.eval()
        loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
        assert loaded.keys() == tensors.keys()
        for k in tensors:  # PEFT keeps the adapter fp32 under a bf16 base (autocast_adapter_dtype)
            assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], tensors[k]), k
        with torch.no_grad():
            for d, lp in zip(evals, mine):
                ids = torch.as_tensor(d.tokens, dtype=torch.long)[None]
                logits = pm(input_ids=ids, use_cache=False).logits[0].float()
                targets = torch.as_tensor(d.inputs["target_tokens"], dtype=torch.long)
                ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
                assert_lp_close(lp, ref.numpy(), f"peft {dtype}")

    # Round trip through export + import (weights and AdamW state) in bf16: the copy is exact.
    copy = f"{aid}-copy"
    e.import_adapter(copy, QWEN, e.adapters[aid].config, tensors, trainable=True,
                     optimizer_state=e.optimizer_state(aid))
    again = run(e, [ForwardItem(copy, evals)], backward=False)[0].logprobs
    for a, b in zip(again, mine):
        np.testing.assert_array_equal(a, b)
    # One more step of each (same data, restored moments) lands on the same weights.
    for name in (aid, copy):
        run(e, [ForwardItem(name, train[0].data)], backward=True)
        e.optim_step(name, ADAM)
    for p, q in zip(e.adapters[aid].parameters(), e.adapters[copy].parameters()):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q, p, rtol=0, atol=0)
