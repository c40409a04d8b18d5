"""Exactness tests of the multi-LoRA engine (server/engine), fp32 on CPU.

Every check compares the engine against an independent reference: plain `peft` LoRA on a
fresh copy of the same tiny base model, an unpacked Hugging Face forward, `torch.optim.AdamW`
with `clip_grad_norm_`, and loss formulas written here from reference/tinker-api.md.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import save_file

from server.engine import losses
from server.engine.engine import AdapterConfig, Engine, EngineDatum, EngineInputError, ForwardItem, ForwardResult
from server.engine.lora import LoRARouting
from server.engine.packing import plan_micro_batches
from server.engine.sampler import SampleRequest
from server.tiny import build_tiny_model

from engine_helpers import randomize_lora_B

pytestmark = [
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

QWEN, LLAMA = "tiny-qwen3", "tiny-llama"
VOCAB = 4096
# Module names of each trainable group, written out here (not taken from the engine).
GROUP_MODULES = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "unembed": ["lm_head"],
}
ADAM = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    e = Engine(device="cpu")
    e.load_model(QWEN)  # tiny-llama is loaded on first use (load_model caches)
    return e


_ids = itertools.count()


def new_adapter(engine, base_name=QWEN, **config):
    adapter_id = f"adapter-{next(_ids)}"
    return adapter_id, engine.create_adapter(adapter_id, base_name, AdapterConfig(**config))


def zero_grads(adapter):
    for t in adapter.parameters():
        t.grad = None


def grads_of(adapter):
    out = {}
    for name, pair in adapter.pairs.items():
        assert pair.lora_A.grad is not None and pair.lora_B.grad is not None, name
        out[name] = (pair.lora_A.grad.detach().clone(), pair.lora_B.grad.detach().clone())
    return out


def weights_of(adapter):
    return {name: (p.lora_A.detach().clone(), p.lora_B.detach().clone()) for name, p in adapter.pairs.items()}


def rel_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    denom = expected.norm()
    if denom == 0:
        return float(actual.norm())
    return float((actual - expected).norm() / denom)


def assert_grads_close(actual: dict, expected: dict, tol=1e-5):
    assert actual.keys() == expected.keys()
    for name in expected:
        for kind, a, b in zip("AB", actual[name], expected[name]):
            assert b.norm() > 0, f"{name}.lora_{kind} has a zero reference grad (weak test)"
            err = rel_err(a, b)
            assert err <= tol, f"{name}.lora_{kind}: relative error {err:.3g}"


def datum(tokens, weights=None, **inputs):
    """A next-token datum from a token list: model_input = tokens[:-1], targets = tokens[1:]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens) - 1
    if weights is None:
        weights = np.ones(n, dtype=np.float32)
    loss_inputs = {"target_tokens": tokens[1:].copy()}
    if weights is not False:
        loss_inputs["weights"] = np.asarray(weights, dtype=np.float32)
    for k, v in inputs.items():
        loss_inputs[k] = np.asarray(v, dtype=np.float32)
    return EngineDatum(tokens[:-1].copy(), loss_inputs)


def rand_seq(rng, n):
    return rng.integers(0, 4000, n).tolist()


def peft_reference(engine, adapter_id):
    """Plain PEFT LoRA on a fresh copy of the base with the engine adapter's weights."""
    adapter = engine.adapters[adapter_id]
    cfg = adapter.config
    targets = [m for g in sorted(cfg.groups()) for m in GROUP_MODULES[g]]
    model = build_tiny_model(adapter.base)  # fp32, cpu, eval
    lora = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0, bias="none"
    )
    pm = peft.get_peft_model(model, lora)
    tensors, _ = engine.export_adapter(adapter_id)
    expected_keys = set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False))
    assert set(tensors) == expected_keys, "exported keys differ from PEFT's saved key names"
    result = peft.set_peft_model_state_dict(pm, tensors)
    assert not result.unexpected_keys
    pm.eval()
    return pm


def peft_lora_tensors(pm, name):
    module = pm.base_model.model.get_submodule(name)
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def peft_grads(pm, names):
    out = {}
    for name in names:
        a, b = peft_lora_tensors(pm, name)
        out[name] = (a.grad.detach().clone(), b.grad.detach().clone())
    return out


def hf_logits(model, tokens):
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]
    return model(input_ids=ids, use_cache=False).logits[0].float()  # [N, V]


def hf_target_logprobs(model, d: EngineDatum):
    logits = hf_logits(model, d.tokens)
    targets = torch.as_tensor(d.inputs["target_tokens"], dtype=torch.long)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def ok(result):
    assert isinstance(result, ForwardResult), f"expected a result, got {result!r}"
    return result


def forward_one(engine, item, backward):
    return ok(engine.forward([item], backward=backward)[0])


# ------------------------------------------------------------------ 1. packing isolation


def test_packing_isolation_across_adapters_and_base(engine):
    base = engine.bases[QWEN]
    rng = np.random.default_rng(1)
    id_a, a = new_adapter(engine, rank=8, seed=1)
    id_b, b = new_adapter(engine, rank=4, seed=2, train_mlp=False)
    randomize_lora_B(a, 100)
    randomize_lora_B(b, 101)
    seqs = [rand_seq(rng, n) for n in (8, 13, 6, 17, 10, 4)]
    owners = [id_a, id_b, None, id_a, None, id_b]

    alone = []
    for owner, s in zip(owners, seqs):
        item = ForwardItem(owner, [datum(s)])
        alone.append(engine._packed_pass(base, [item], backward=False)[0].logprobs[0])
        if owner is not None:  # the public path gives the same
            np.testing.assert_array_equal(forward_one(engine, item, False).logprobs[0], alone[-1])

    # The adapters matter (else isolation would be trivially true).
    base_lp = engine._packed_pass(base, [ForwardItem(None, [datum(seqs[0])])], backward=False)[0].logprobs[0]
    assert np.abs(base_lp - alone[0]).max() > 1e-3

    # All in one packed row, items interleaved across adapters and the base.
    items = [ForwardItem(o, [datum(s)]) for o, s in zip(owners, seqs)]
    packed = engine._packed_pass(base, items, backward=False)
    for k, (res, ref) in enumerate(zip(packed, alone)):
        np.testing.assert_allclose(res.logprobs[0], ref, atol=1e-5, rtol=0, err_msg=f"sequence {k}")

    # Several data per item, one item per adapter, through the public forward.
    items = [ForwardItem(id_a, [datum(seqs[0]), datum(seqs[3])]), ForwardItem(id_b, [datum(seqs[1]), datum(seqs[5])])]
    res = engine.forward(items, backward=False)
    np.testing.assert_allclose(ok(res[0]).logprobs[0], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ok(res[0]).logprobs[1], alone[3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ok(res[1]).logprobs[0], alone[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ok(res[1]).logprobs[1], alone[5], atol=1e-5, rtol=0)


def test_micro_batches_and_logprob_chunks_match_one_pass(engine):
    rng = np.random.default_rng(2)
    id_a, a = new_adapter(engine, rank=8, seed=3)
    id_b, b = new_adapter(engine, rank=2, seed=4, train_attn=False)
    randomize_lora_B(a, 102)
    randomize_lora_B(b, 103)
    lengths = (9, 12, 7, 15, 5)
    seqs = [rand_seq(rng, n) for n in lengths]
    weights = [rng.uniform(-1, 2, n - 1).astype(np.float32) for n in lengths]
    items = [
        ForwardItem(id_a, [datum(seqs[0], weights[0]), datum(seqs[1], weights[1]), datum(seqs[4], weights[4])]),
        ForwardItem(id_b, [datum(seqs[2], weights[2]), datum(seqs[3], weights[3])]),
    ]

    def run(token_budget, chunk):
        old = engine.token_budget, engine.logprob_chunk
        engine.token_budget, engine.logprob_chunk = token_budget, chunk
        try:
            res = [ok(r) for r in engine.forward(items, backward=True)]
        finally:
            engine.token_budget, engine.logprob_chunk = old
        grads = {"a": grads_of(a), "b": grads_of(b)}
        zero_grads(a)
        zero_grads(b)
        return res, grads

    small_budget, small_chunk = 20, 5
    slots = [a.slot] * 3 + [b.slot] * 2
    assert len(plan_micro_batches([n - 1 for n in (lengths[0], lengths[1], lengths[4], lengths[2], lengths[3])], slots, small_budget)) >= 3

    one_res, one_grads = run(4096, 1024)
    many_res, many_grads = run(small_budget, small_chunk)
    for r1, r2 in zip(one_res, many_res):
        for lp1, lp2 in zip(r1.logprobs, r2.logprobs):
            np.testing.assert_allclose(lp2, lp1, atol=1e-5, rtol=0)
        assert r2.metrics["loss:sum"] == pytest.approx(r1.metrics["loss:sum"], rel=1e-5, abs=1e-5)
    assert_grads_close(many_grads["a"], one_grads["a"])
    assert_grads_close(many_grads["b"], one_grads["b"])


def test_head_sees_one_chunk_at_a_time_and_only_the_last_is_kept_for_backward(engine, monkeypatch):
    """Target logprobs never put more than `logprob_chunk` tokens through the (vocab-sized)
    head; with gradients every chunk but the last is recomputed in backward (checkpointed),
    the last keeps its activations (backward starts there: nothing to save by recomputing)."""
    rng = np.random.default_rng(9)
    aid, ad = new_adapter(engine, rank=4, seed=21)
    item = ForwardItem(aid, [datum(rand_seq(rng, n)) for n in (14, 9, 11)])  # 31 target tokens
    rows = []  # tokens per call of the head's chunk function (forward and recompute)
    chunk_logprobs = losses._chunk_logprobs
    monkeypatch.setattr(losses, "_chunk_logprobs",
                        lambda head, hidden, *rest: rows.append(hidden.shape[0]) or chunk_logprobs(head, hidden, *rest))
    old = engine.logprob_chunk
    engine.logprob_chunk = 8
    try:
        for backward in (False, True):
            rows.clear()
            ok(engine.forward([item], backward=backward)[0])
            assert max(rows) <= 8
            chunks = -(-31 // 8)
            assert len(rows) == (2 * chunks - 1 if backward else chunks)
    finally:
        engine.logprob_chunk = old
        zero_grads(ad)


# ------------------------------------------------- 2. several adapters in one packed pass


def test_gradients_of_adapters_trained_together_equal_alone(engine):
    rng = np.random.default_rng(3)
    configs = [
        dict(rank=2, seed=11, train_mlp=False, train_unembed=False),  # attention only
        dict(rank=4, seed=12, train_attn=False, train_unembed=False),  # MLP only
        dict(rank=8, seed=13),  # everything
        dict(rank=16, alpha=8.0, seed=14, train_attn=False, train_mlp=False),  # unembed only
    ]
    adapters = []
    for k, cfg in enumerate(configs):
        aid, ad = new_adapter(engine, **cfg)
        randomize_lora_B(ad, 200 + k)
        adapters.append((aid, ad))
    leaves = {aid: {n.rsplit(".", 1)[-1] for n in ad.pairs} for aid, ad in adapters}
    assert leaves[adapters[0][0]] == set(GROUP_MODULES["attn"])
    assert leaves[adapters[1][0]] == set(GROUP_MODULES["mlp"])
    assert leaves[adapters[2][0]] == {m for ms in GROUP_MODULES.values() for m in ms}
    assert leaves[adapters[3][0]] == {"lm_head"}

    items = []
    for k, (aid, _) in enumerate(adapters):
        data = []
        for n in rng.integers(5, 14, 2):
            s = rand_seq(rng, int(n))
            if k == 2:  # one item with an RL loss, to check per-item losses in a shared pass
                data.append(datum(s, False, logprobs=rng.normal(-8.3, 0.2, n - 1), advantages=rng.normal(0, 1, n - 1)))
            else:
                data.append(datum(s, rng.uniform(-1, 1, n - 1)))
        loss = "ppo" if k == 2 else "cross_entropy"
        items.append(ForwardItem(aid, data, loss, {"clip_low_threshold": 0.9} if k == 2 else {}))

    alone_grads, alone_loss = [], []
    for (aid, ad), item in zip(adapters, items):
        alone_loss.append(forward_one(engine, item, True).metrics["loss:sum"])
        alone_grads.append(grads_of(ad))
        zero_grads(ad)

    together = engine.forward(items, backward=True)
    for k, ((aid, ad), res) in enumerate(zip(adapters, together)):
        assert ok(res).metrics["loss:sum"] == pytest.approx(alone_loss[k], rel=1e-5, abs=1e-6)
        assert_grads_close(grads_of(ad), alone_grads[k])
        zero_grads(ad)


# ------------------------------------- 3. cross_entropy + AdamW against plain PEFT + torch


@pytest.mark.parametrize("weight_kind", ["mask", "signed_fractional"])
def test_adamw_steps_match_peft_reference(engine, weight_kind):
    rng = np.random.default_rng(4)
    aid, ad = new_adapter(engine, rank=8, alpha=16.0, seed=21)
    pm = peft_reference(engine, aid)  # initial weights (lora_B = 0)
    names = list(ad.pairs)

    data = []
    for n in (11, 16, 8):
        s = rand_seq(rng, n)
        if weight_kind == "mask":
            w = np.ones(n - 1, np.float32)
            w[:3] = 0.0  # a "prompt"
        else:
            w = rng.uniform(-1.5, 1.5, n - 1).astype(np.float32)
            assert (w < 0).any() and (w > 0).any()
        data.append(datum(s, w))

    def ref_loss():
        total = 0.0
        for d in data:
            lp = hf_target_logprobs(pm, d)
            total = total + (-lp * torch.as_tensor(d.inputs["weights"])).sum()
        return total

    params = [t for n in names for t in peft_lora_tensors(pm, n)]
    # grad_clip_norm: half the first step's gradient norm, so clipping triggers.
    ref_loss().backward()
    clip = 0.5 * float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    for p in params:
        p.grad = None
    adam = dict(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.3, grad_clip_norm=clip)
    opt = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.3)

    clipped_steps = 0
    for step in range(5):
        res = forward_one(engine, ForwardItem(aid, data, "cross_entropy"), backward=True)
        metrics = engine.optim_step(aid, adam)

        opt.zero_grad(set_to_none=True)
        loss = ref_loss()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        opt.step()

        assert res.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-5)
        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)
        clipped_steps += norm > clip
    assert clipped_steps >= 1

    max_diff = 0.0
    moved = 0.0
    for name in names:
        ref_a, ref_b = (t.detach() for t in peft_lora_tensors(pm, name))
        pair = ad.pairs[name]
        max_diff = max(max_diff, float((pair.lora_A.detach() - ref_a).abs().max()),
                       float((pair.lora_B.detach() - ref_b).abs().max()))
        moved = max(moved, float(pair.lora_B.detach().abs().max()))
    assert moved > 1e-3, "the adapter did not train"
    assert max_diff <= 1e-5, f"max abs weight difference {max_diff:.3g} after 5 steps"


# ------------------------------------------------- 4. one adapter's step leaves others alone


def test_optim_step_touches_only_its_adapter(engine):
    rng = np.random.default_rng(5)
    id_a, a = new_adapter(engine, rank=4, seed=31)
    id_b, b = new_adapter(engine, rank=8, seed=32)
    seq_a, seq_b = rand_seq(rng, 10), rand_seq(rng, 12)
    adam = dict(ADAM, learning_rate=1e-2, weight_decay=0.5, grad_clip_norm=0.1)

    def both_backward():
        res = engine.forward(
            [ForwardItem(id_a, [datum(seq_a)]), ForwardItem(id_b, [datum(seq_b)])], backward=True
        )
        assert all(isinstance(r, ForwardResult) for r in res)

    for round_ in range(2):  # second round: b has Adam state of its own too
        both_backward()
        before_w, before_g = weights_of(b), grads_of(b)
        before_state = engine.optimizer_state(id_b)
        before_moments = {
            k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
            for k, s in before_state["optimizer"]["state"].items()
        }
        a_before = weights_of(a)
        engine.optim_step(id_a, adam)
        for name in b.pairs:
            assert torch.equal(b.pairs[name].lora_A, before_w[name][0])
            assert torch.equal(b.pairs[name].lora_B, before_w[name][1])
            assert torch.equal(b.pairs[name].lora_A.grad, before_g[name][0])
            assert torch.equal(b.pairs[name].lora_B.grad, before_g[name][1])
        after_state = engine.optimizer_state(id_b)["optimizer"]["state"]
        assert after_state.keys() == before_moments.keys()
        for k, moments in before_moments.items():
            for n, v in moments.items():
                assert torch.equal(after_state[k][n], v)
        assert all(p.grad is None for p in a.parameters())
        assert any(not torch.equal(a.pairs[n].lora_A, a_before[n][0]) for n in a.pairs)  # decay moved A
        engine.optim_step(id_b, adam)
        assert all(p.grad is None for p in b.parameters())
        if round_ == 0:
            assert any(not torch.equal(b.pairs[n].lora_B, before_w[n][1]) for n in b.pairs)


def test_optim_steps_of_many_adapters_equal_each_alone(engine):
    """A cycle's optim_steps share multi-tensor updates (one per set of hyperparameters);
    each adapter ends bit-identical to the same step taken alone, and a refused pair
    (unknown adapter, one named twice) steps nothing."""
    rng = np.random.default_rng(9)
    adams = [dict(ADAM, learning_rate=1e-2, weight_decay=0.5, grad_clip_norm=0.05),
             dict(ADAM, learning_rate=1e-2, weight_decay=0.5, grad_clip_norm=0.05),  # same group
             dict(ADAM, learning_rate=3e-3, beta2=0.99),
             dict(ADAM, learning_rate=1e-3, grad_clip_norm=1e3)]  # a clip that does not bite
    together, alone = [], []
    for seed in range(len(adams)):
        for copies in (together, alone):
            copies.append(new_adapter(engine, rank=4 + 2 * seed, seed=90 + seed))
    for round_ in range(3):  # later rounds step existing moments
        seqs = [rand_seq(rng, 6 + k) for k in range(len(adams))]
        for copies in (together, alone):
            res = engine.forward([ForwardItem(aid, [datum(seq)]) for (aid, _), seq in zip(copies, seqs)],
                                 backward=True)
            assert all(isinstance(r, ForwardResult) for r in res)
        batch = [(aid, adam) for (aid, _), adam in zip(together, adams)]
        if round_ == 0:
            batch = batch + [("no-such-adapter", ADAM), (together[0][0], ADAM)]
        out = engine.optim_steps(batch)
        solo = [engine.optim_step(aid, adam) for (aid, _), adam in zip(alone, adams)]
        assert out[:len(adams)] == solo  # grad norms and step counts
        for (_, a), (_, b) in zip(together, alone):
            for name in a.pairs:
                assert torch.equal(a.pairs[name].lora_A, b.pairs[name].lora_A)
                assert torch.equal(a.pairs[name].lora_B, b.pairs[name].lora_B)
        if round_ == 0:
            assert isinstance(out[-2], EngineInputError) and "no-such-adapter" in str(out[-2])
            assert isinstance(out[-1], EngineInputError) and "twice" in str(out[-1])
    assert solo[0]["step:max"] == 3.0 and solo[0]["grad_norm:mean"] > 0.05  # the clip did bite


# ------------------------------------------------------------------------ 5. PEFT export


@pytest.mark.parametrize("base_name", [QWEN, LLAMA])
def test_peft_export_reproduces_engine_logits(engine, base_name, tmp_path):
    rng = np.random.default_rng(6)
    base = engine.load_model(base_name)
    aid, ad = new_adapter(engine, base_name, rank=8, alpha=16.0, seed=41)
    train = [datum(rand_seq(rng, n)) for n in (12, 9)]
    for _ in range(3):
        forward_one(engine, ForwardItem(aid, train), backward=True)
        engine.optim_step(aid, dict(ADAM, learning_rate=1e-2))
    assert max(float(p.lora_B.detach().abs().max()) for p in ad.pairs.values()) > 1e-3

    tensors, config = engine.export_adapter(aid)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    pm = peft.PeftModel.from_pretrained(build_tiny_model(base_name), str(tmp_path))
    pm.eval()
    loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k]), k

    evals = [datum(rand_seq(rng, n)) for n in (7, 15, 10)]
    res = forward_one(engine, ForwardItem(aid, evals), backward=False)
    with torch.no_grad():
        for d, lp in zip(evals, res.logprobs):
            ref = hf_target_logprobs(pm, d).numpy()
            np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
            # Full logits: the engine's wrapped model routed to the adapter.
            ids = torch.as_tensor(d.tokens, dtype=torch.long)[None]
            with LoRARouting(base.lora_layers, [(ad.slot, 0, ids.shape[1])]):
                logits = base.model(input_ids=ids, use_cache=False).logits[0].float()
            ref_logits = hf_logits(pm, d.tokens)
            assert float((logits - ref_logits).abs().max()) <= 1e-5
            with pm.disable_adapter():  # the adapter does change the output
                assert float((hf_logits(pm, d.tokens) - ref_logits).abs().max()) > 1e-3


# ---------------------------------------------------------------------------- 6. RL losses


def formula(loss_fn, lp, q, adv, config):
    """Tinker's RL losses (reference/tinker-api.md), written independently of the engine."""
    lo = config.get("clip_low_threshold", 0.8)
    hi = config.get("clip_high_threshold", 1.2)
    ratio = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    if loss_fn == "ppo":
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, lo, hi) * adv
        return -torch.where(unclipped <= clipped, unclipped, clipped).sum()
    if loss_fn == "cispo":
        weight = torch.clamp(ratio, lo, hi).detach()
        return -(weight * lp * adv).sum()
    if loss_fn == "dro":
        beta = config["beta"]
        return -(lp * adv).sum() + 0.5 * beta * ((lp - q) ** 2).sum()
    raise AssertionError(loss_fn)


RL_CASES = [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("cispo", {"clip_low_threshold": 0.85, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.3}),
]


@pytest.mark.parametrize("loss_fn,config", RL_CASES, ids=[f"{l}{'-cfg' if c else ''}" for l, c in RL_CASES])
def test_rl_loss_gradients_match_formula(engine, loss_fn, config):
    rng = np.random.default_rng(7)
    aid, ad = new_adapter(engine, rank=8, seed=51)
    randomize_lora_B(ad, 300)
    pm = peft_reference(engine, aid)
    names = list(ad.pairs)

    seqs = [rand_seq(rng, n) for n in (24, 33, 17, 9)]
    plain = [datum(s) for s in seqs]
    with torch.no_grad():
        ref_lp0 = [hf_target_logprobs(pm, d) for d in plain]
    data = []
    for s, lp0 in zip(seqs, ref_lp0):
        n = len(s) - 1
        q = lp0.numpy() + rng.normal(0, 0.25, n)  # sampler logprobs near the current policy
        adv = rng.normal(0, 1, n)
        adv[:2] = 0.0  # prompt positions
        data.append(datum(s, False, logprobs=q, advantages=adv))
    ratios = np.concatenate([np.exp(lp0.numpy() - d.inputs["logprobs"]) for lp0, d in zip(ref_lp0, data)])
    advs = np.concatenate([d.inputs["advantages"] for d in data])
    lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    # Every clipping region is hit with both signs of the advantage (ppo clips r < lo only
    # for A < 0 and r > hi only for A > 0).
    for region in (ratios < lo, ratios > hi, (ratios > lo) & (ratios < hi)):
        assert (region & (advs > 0)).any() and (region & (advs < 0)).any()

    res = forward_one(engine, ForwardItem(aid, data, loss_fn, dict(config)), backward=True)
    engine_grads = grads_of(ad)
    zero_grads(ad)

    total = 0.0
    for d, lp_eng in zip(data, res.logprobs):
        lp = hf_target_logprobs(pm, d)
        np.testing.assert_allclose(lp_eng, lp.detach().numpy(), atol=1e-5, rtol=0)
        q = torch.as_tensor(d.inputs["logprobs"])
        adv = torch.as_tensor(d.inputs["advantages"])
        total = total + formula(loss_fn, lp, q, adv, config)
    total.backward()
    assert res.metrics["loss:sum"] == pytest.approx(float(total.detach()), rel=1e-5, abs=1e-5)
    assert_grads_close(engine_grads, peft_grads(pm, names))


# ------------------------------------------------------------------------------ 7. sampler


def full_logprobs_of(engine, adapter_id, base_name, prompt, tokens):
    """Engine forward logprobs of `tokens` continuing `prompt`."""
    seq = list(prompt) + list(tokens)
    if adapter_id is None:
        out = engine.prompt_logprobs(base_name, [(None, np.asarray(seq))])[0]
        return np.asarray(out[len(prompt):], dtype=np.float64)
    res = forward_one(engine, ForwardItem(adapter_id, [datum(seq)]), backward=False)
    return res.logprobs[0][len(prompt) - 1:]


def test_sampled_logprobs_equal_forward_logprobs(engine):
    rng = np.random.default_rng(8)
    aid, ad = new_adapter(engine, rank=8, seed=61)
    randomize_lora_B(ad, 400)
    prompt = rand_seq(rng, 6)
    reqs = [
        SampleRequest(slot=ad.slot, prompt=prompt, num_samples=3, max_tokens=8, temperature=1.0, seed=5),
        SampleRequest(slot=ad.slot, prompt=prompt[:4], num_samples=1, max_tokens=6, temperature=0.7,
                      top_k=50, top_p=0.9, seed=6),
        SampleRequest(slot=None, prompt=prompt[1:], num_samples=2, max_tokens=7, temperature=1.0, seed=7),
    ]
    outs = engine.sample(QWEN, reqs)
    for req, samples in zip(reqs, outs):
        assert len(samples) == req.num_samples
        for s in samples:
            assert s.stop_reason == "length" and len(s.tokens) == req.max_tokens == len(s.logprobs)
            owner = aid if req.slot is not None else None
            expected = full_logprobs_of(engine, owner, QWEN, req.prompt, s.tokens)
            np.testing.assert_allclose(s.logprobs, expected, atol=1e-5, rtol=0)
            # compute_logprobs' path (prompt_logprobs) agrees too
            pl = engine.prompt_logprobs(QWEN, [(owner, np.asarray(req.prompt + s.tokens))])[0]
            assert pl[0] is None
            np.testing.assert_allclose(s.logprobs, pl[len(req.prompt):], atol=1e-5, rtol=0)
    assert outs[0][0].tokens != outs[0][1].tokens  # rows of one request differ


def test_sampling_seeds(engine):
    prompt = [11, 22, 33, 44]

    def draw(seed):
        req = SampleRequest(slot=None, prompt=prompt, num_samples=2, max_tokens=8, temperature=1.0, seed=seed)
        return [s.tokens for s in engine.sample(QWEN, [req])[0]]

    first = draw(123)
    assert draw(123) == first
    assert draw(124) != first


def test_greedy_sampling_equals_hf_argmax_loop(engine):
    rng = np.random.default_rng(9)
    aid, ad = new_adapter(engine, rank=8, seed=71)
    randomize_lora_B(ad, 500)
    pm = peft_reference(engine, aid)
    prompt = rand_seq(rng, 5)
    n_new = 10

    seq = list(prompt)
    ref_lps = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = hf_logits(pm, seq)[-1]
            nxt = int(torch.argmax(logits))
            ref_lps.append(float(torch.log_softmax(logits, -1)[nxt]))
            seq.append(nxt)
    expected = seq[len(prompt):]

    variants = [
        dict(temperature=0.0, seed=1),
        dict(temperature=0.0, seed=2),
        dict(temperature=1.0, top_k=1, seed=3),  # top_k = 1 is greedy too
        dict(temperature=1.0, top_p=1e-6, seed=4),  # so is a tiny nucleus
    ]
    for v in variants:
        out = engine.sample(QWEN, [SampleRequest(slot=ad.slot, prompt=prompt, num_samples=2, max_tokens=n_new, **v)])[0]
        for s in out:
            assert s.tokens == expected, v
            np.testing.assert_allclose(s.logprobs, ref_lps, atol=1e-5, rtol=0)


def test_mixed_batch_equals_each_request_alone(engine):
    rng = np.random.default_rng(10)
    id_a, a = new_adapter(engine, rank=8, seed=81)
    id_b, b = new_adapter(engine, rank=4, seed=82, train_attn=False)
    randomize_lora_B(a, 600)
    randomize_lora_B(b, 601)
    reqs = [
        SampleRequest(slot=a.slot, prompt=rand_seq(rng, 4), num_samples=2, max_tokens=6, seed=1),
        SampleRequest(slot=None, prompt=rand_seq(rng, 6), num_samples=2, max_tokens=5, seed=3),
        SampleRequest(slot=b.slot, prompt=rand_seq(rng, 9), num_samples=1, max_tokens=7, temperature=0.0, seed=2),
        SampleRequest(slot=a.slot, prompt=rand_seq(rng, 7), num_samples=1, max_tokens=4, temperature=0.8,
                      top_k=40, seed=4),
    ]
    together = engine.sample(QWEN, reqs)
    for req, outs in zip(reqs, together):
        alone = engine.sample(QWEN, [req])[0]
        assert len(outs) == len(alone) == req.num_samples
        for s, t in zip(outs, alone):
            assert s.tokens == t.tokens
            assert s.stop_reason == t.stop_reason == "length"
            np.testing.assert_allclose(s.logprobs, t.logprobs, atol=1e-5, rtol=0)
    # The adapters matter: a's greedy continuation differs from the base's.
    greedy = [SampleRequest(slot=s, prompt=reqs[0].prompt, num_samples=1, max_tokens=6, temperature=0.0)
              for s in (a.slot, None)]
    with_a, without = engine.sample(QWEN, greedy)
    assert with_a[0].tokens != without[0].tokens


def test_overfit_recites_and_stops(engine):
    base = engine.bases[QWEN]
    tok = base.tokenizer
    text = "The quick brown fox jumps over the lazy dog and then runs far away into the woods."
    ids = tok.encode(text)
    assert len(ids) >= 16
    aid, ad = new_adapter(engine, rank=8, alpha=32.0, seed=91)
    d = datum(ids)
    # lr 1e-2 oscillates on this random-init model (loss stuck near 60); 3e-3 converges.
    adam = dict(ADAM, learning_rate=3e-3)
    for _ in range(50):
        res = forward_one(engine, ForwardItem(aid, [d]), backward=True)
        engine.optim_step(aid, adam)
    assert res.metrics["loss:sum"] < 0.1 * len(ids)

    prefix, rest = ids[:4], ids[4:]

    def greedy(**kw):
        req = SampleRequest(slot=ad.slot, prompt=prefix, num_samples=1, temperature=0.0,
                            max_tokens=kw.pop("max_tokens", len(rest)), **kw)
        return engine.sample(QWEN, [req])[0][0]

    out = greedy()
    assert out.tokens == rest, tok.decode(out.tokens)
    assert out.stop_reason == "length"

    # max_tokens
    out = greedy(max_tokens=3)
    assert out.tokens == rest[:3] and out.stop_reason == "length"

    # stop token ids: generation stops on (and includes) the first stop token
    k = next(i for i in range(5, len(rest)) if rest[i] not in rest[:i])
    out = greedy(stop_token_ids=[rest[k], 4095])
    assert out.tokens == rest[:k + 1] and out.stop_reason == "stop"

    # stop strings: stops at the first token completing the string, which is included
    stop = " lazy"
    j = next(j for j in range(1, len(rest) + 1) if stop in tok.decode(rest[:j]))
    assert j < len(rest)
    out = greedy(stop_strings=["no such string", stop])
    assert out.tokens == rest[:j] and out.stop_reason == "stop"
    assert tok.decode(out.tokens).endswith(stop) or stop in tok.decode(out.tokens)
    # a stop string that never occurs changes nothing
    out = greedy(stop_strings=["zzzz"], stop_token_ids=[4095])
    assert out.tokens == rest and out.stop_reason == "length"


# ---------------------------------------------------------------------------- 8. bad input


def _good(rng, n=8):
    return datum(rand_seq(rng, n))


def _bad_cases():
    """(name, build(rng) -> ForwardItem fields, expected where, word in the message)."""

    def with_bad_datum(make_bad, loss="cross_entropy", config=None):
        def build(rng, aid):
            good = _good(rng)
            return ForwardItem(aid, [good, make_bad(rng)], loss, config or {})
        return build

    def token_outside(rng):
        d = _good(rng)
        d.tokens[3] = VOCAB + 5
        return d

    def negative_token(rng):
        d = _good(rng)
        d.tokens[0] = -1
        return d

    def target_outside(rng):
        d = _good(rng)
        d.inputs["target_tokens"][2] = VOCAB
        return d

    def length_mismatch(rng):
        d = _good(rng)
        d.inputs["weights"] = np.ones(len(d.tokens) + 1, np.float32)
        return d

    def nan_weight(rng):
        d = _good(rng)
        d.inputs["weights"][1] = np.nan
        return d

    def inf_advantage(rng):
        s = rand_seq(rng, 8)
        return datum(s, False, logprobs=np.full(7, -8.0), advantages=np.array([1, 1, np.inf, 1, 1, 1, 1]))

    def nan_logprob(rng):
        s = rand_seq(rng, 8)
        return datum(s, False, logprobs=np.array([-8, np.nan, -8, -8, -8, -8, -8]), advantages=np.ones(7))

    def missing_advantages(rng):
        s = rand_seq(rng, 8)
        return datum(s, False, logprobs=np.zeros(7))

    def ppo_good(rng):
        s = rand_seq(rng, 8)
        return datum(s, False, logprobs=np.full(7, -8.0), advantages=np.ones(7))

    def too_long(rng):
        return datum(rand_seq(rng, 2050))  # 2049 input tokens > 2048

    def empty(rng):
        return EngineDatum(np.zeros(0, np.int64), {"target_tokens": np.zeros(0, np.int64), "weights": np.zeros(0, np.float32)})

    def ppo_item(make_bad):
        def build(rng, aid):
            return ForwardItem(aid, [ppo_good(rng), make_bad(rng)], "ppo", {})
        return build

    def whole_item(loss, config):
        def build(rng, aid):
            return ForwardItem(aid, [ppo_good(rng), ppo_good(rng)], loss, config)
        return build

    return [
        ("token_outside_vocab", with_bad_datum(token_outside), "data[1].model_input", "vocabulary"),
        ("negative_token", with_bad_datum(negative_token), "data[1].model_input", "vocabulary"),
        ("target_outside_vocab", with_bad_datum(target_outside), "data[1].loss_fn_inputs.target_tokens", "vocabulary"),
        ("length_mismatch", with_bad_datum(length_mismatch), "data[1].loss_fn_inputs.weights", "shape"),
        ("nan_weight", with_bad_datum(nan_weight), "data[1].loss_fn_inputs.weights", "NaN"),
        ("unknown_loss", whole_item("cross_entropee", {}), "loss_fn", "unknown"),
        ("inf_advantage", ppo_item(inf_advantage), "data[1].loss_fn_inputs.advantages", "inf"),
        ("nan_logprob", ppo_item(nan_logprob), "data[1].loss_fn_inputs.logprobs", "NaN"),
        ("missing_advantages", ppo_item(missing_advantages), "data[1].loss_fn_inputs.advantages", "advantages"),
        ("dro_without_beta", whole_item("dro", {}), "loss_fn_config", "beta"),
        ("unknown_config_key", whole_item("ppo", {"clip_ratio": 0.2}), "loss_fn_config", "clip_ratio"),
        ("longer_than_context", with_bad_datum(too_long), "data[1].model_input", "context"),
        ("empty_model_input", with_bad_datum(empty), "data[1].model_input", "empty"),
    ]


BAD_CASES = _bad_cases()


@pytest.fixture(scope="module")
def bad_input_adapter(engine):
    aid, ad = new_adapter(engine, rank=4, seed=101)
    randomize_lora_B(ad, 700)
    return aid, ad


@pytest.mark.parametrize("name,build,where,word", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_rejected_with_where(engine, bad_input_adapter, name, build, where, word):
    aid, ad = bad_input_adapter
    rng = np.random.default_rng(11)
    item = build(rng, aid)
    for backward in (False, True):
        (res,) = engine.forward([item], backward=backward)
        assert isinstance(res, EngineInputError), res
        assert res.where == where
        assert word.lower() in str(res).lower()
        assert all(p.grad is None for p in ad.parameters())


def test_bad_item_fails_alone_in_a_batch(engine):
    rng = np.random.default_rng(12)
    id_a, a = new_adapter(engine, rank=8, seed=111)
    id_b, b = new_adapter(engine, rank=4, seed=112)
    randomize_lora_B(a, 800)
    randomize_lora_B(b, 801)
    good = ForwardItem(id_a, [_good(rng, 9), _good(rng, 13)], "cross_entropy")
    alone = forward_one(engine, good, backward=True)
    alone_grads = grads_of(a)
    zero_grads(a)

    bad_vocab = _good(rng)
    bad_vocab.tokens[2] = VOCAB
    bad_nan = _good(rng)
    bad_nan.inputs["weights"][0] = np.nan
    too_long = datum(rand_seq(rng, 2050))
    items = [
        ForwardItem(id_b, [too_long]),  # longer than the context: fails alone, before compute
        ForwardItem(id_b, [_good(rng), bad_vocab]),  # another adapter's bad item
        good,
        ForwardItem(id_a, [_good(rng), bad_nan]),  # a bad item of the same adapter
        ForwardItem("no-such-adapter", [_good(rng)]),
        ForwardItem(id_b, [_good(rng)], "dro", {}),
        ForwardItem(None, [_good(rng)]),  # forward needs an adapter (no base to run it on)
    ]
    too_long_result, *results = engine.forward(items, backward=True)
    assert isinstance(too_long_result, EngineInputError) and too_long_result.where == "data[0].model_input"
    assert "context" in str(too_long_result)
    assert isinstance(results[0], EngineInputError) and results[0].where == "data[1].model_input"
    assert isinstance(results[2], EngineInputError) and results[2].where == "data[1].loss_fn_inputs.weights"
    assert isinstance(results[3], EngineInputError)
    assert isinstance(results[4], EngineInputError) and results[4].where == "loss_fn_config"
    assert isinstance(results[5], EngineInputError)
    res = ok(results[1])
    for lp, lp_alone in zip(res.logprobs, alone.logprobs):
        np.testing.assert_allclose(lp, lp_alone, atol=1e-6, rtol=0)
    assert res.metrics["loss:sum"] == pytest.approx(alone.metrics["loss:sum"], abs=1e-6)
    for name, (ga, gb) in grads_of(a).items():
        torch.testing.assert_close(ga, alone_grads[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(gb, alone_grads[name][1], atol=1e-6, rtol=0)
    assert all(p.grad is None for p in b.parameters())
    zero_grads(a)


def test_prompt_logprobs_rejects_bad_tokens(engine, bad_input_adapter):
    aid, _ = bad_input_adapter
    good = np.asarray([5, 6, 7])
    for owner in (aid, None):  # with an adapter, and the base model alone
        for bad in ([5, 6, VOCAB, 7], [5, 6, 7, VOCAB], [-1, 5, 6], np.arange(2100) % 4000):
            out = engine.prompt_logprobs(QWEN, [(owner, good), (owner, np.asarray(bad))])
            assert isinstance(out[1], EngineInputError) and out[1].where == "prompt", out[1]
            # the good prompt beside it gets exactly what it gets alone
            assert out[0] == engine.prompt_logprobs(QWEN, [(owner, good)])[0]
        out = engine.prompt_logprobs(QWEN, [(owner, good), (owner, np.asarray([9]))])
        assert out[0][0] is None and len(out[0]) == 3 and out[1] == [None]
    out = engine.prompt_logprobs(QWEN, [(aid, good), ("no-such-adapter", good)])
    assert isinstance(out[1], EngineInputError) and "no-such-adapter" in str(out[1])


def test_prompt_logprobs_of_many_adapters_share_a_pass_and_equal_alone(engine):
    rng = np.random.default_rng(21)
    owners = []
    for k in range(3):
        aid, ad = new_adapter(engine, rank=4 + 4 * k, seed=70 + k)
        randomize_lora_B(ad, 500 + k)
        owners.append(aid)
    owners.append(None)  # the base model, in the same pass
    requests = [(owner, rand_seq(rng, 5 + 3 * i)) for i, owner in enumerate(owners * 2)]
    together = engine.prompt_logprobs(QWEN, requests)
    for request, got in zip(requests, together):
        alone = engine.prompt_logprobs(QWEN, [request])[0]
        assert got[0] is None and alone[0] is None and len(got) == len(request[1])
        np.testing.assert_allclose(got[1:], alone[1:], atol=1e-5, rtol=0)