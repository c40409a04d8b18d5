"""%tinker compare through IPython's shell against a real server (tiny model, real ZeroMQ):
two models' generations side by side, each token scored under both."""

from __future__ import annotations

import html

import pytest
from IPython.core.error import UsageError

from workbench import renderers, types

from conftest import ipython_shell

GREEN = "the sky is blue and the grass is green"
RED = "roses are red and violets are blue"
GREEDY = "--max-tokens 8 --temperature 0"


@pytest.fixture(scope="module")
def ip(server):
    shell = ipython_shell()
    shell.run_line_magic("load_ext", "kernel_ext")
    shell.run_line_magic("tinker", f"connect {server.url} --key {server.api_key}")
    shell.user_ns["qs"] = ["the sky is", "the grass is"]
    yield shell
    shell.run_line_magic("tinker", "stop")


def service_of(ip):
    return ip.magics_manager.registry["TinkerMagics"].session.service


def train(client, text: str, steps: int, lr: float = 1e-2) -> None:
    ids = client.get_tokenizer().encode(text, add_special_tokens=False)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    for _ in range(steps):
        client.forward_backward([datum], "cross_entropy")
        last = client.optim_step(types.AdamParams(learning_rate=lr))
    last.result()


@pytest.fixture(scope="module")
def tc(ip):
    """A run trained a few steps at lr 1e-2: enough to change the tiny model's greedy output."""
    client = service_of(ip).create_lora_training_client("tiny-qwen3", rank=4, seed=0)
    train(client, GREEN, 3)
    ip.user_ns["tc"] = client
    return client


def greedy(client, prompt: types.ModelInput, max_tokens: int = 8, stop=None) -> types.SampledSequence:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    return client.sample(prompt, 1, params).result().sequences[0]


def test_help_documents_compare(ip):
    doc = ip.find_line_magic("tinker").__doc__
    assert "%tinker compare A B --prompts EXPR" in doc and "`base`" in doc


def test_trained_client_against_base(ip, tc):
    """A = the run's current weights, B = its base model: each side's tokens are what that
    model samples alone; each token's logprob under its own model is the sampler's, under the
    other model compute_logprobs' on prompt + generation."""
    view = ip.run_line_magic("tinker", f"compare tc base --prompts qs {GREEDY}")
    service = service_of(ip)
    sampler_a = tc.save_weights_and_get_sampling_client()  # the same weights: nothing trained since
    sampler_b = service.create_sampling_client(base_model="tiny-qwen3")
    tok = tc.get_tokenizer()
    assert view.labels == ("tc", "base (tiny-qwen3)") and len(view.comparisons) == 2
    for c, text in zip(view.comparisons, ip.user_ns["qs"]):
        prompt = types.ModelInput.from_ints(tok.encode(text, add_special_tokens=False))
        assert c.prompt == text and c.prompt_tokens == prompt.to_ints()
        n = prompt.length
        for gen, own, other, own_lp, other_lp in ((c.a, sampler_a, sampler_b, "lp_a", "lp_b"),
                                                  (c.b, sampler_b, sampler_a, "lp_b", "lp_a")):
            alone = greedy(own, prompt)
            assert gen.tokens == alone.tokens and len(gen.tokens) == 8
            assert getattr(gen, own_lp) == pytest.approx(alone.logprobs, abs=1e-5)
            scored = other.compute_logprobs(types.ModelInput.from_ints(prompt.to_ints() + gen.tokens)).result()
            assert getattr(gen, other_lp) == pytest.approx(scored[n:], abs=1e-5)
            assert gen.text == tok.decode(gen.tokens)
        differ = [i for i, (x, y) in enumerate(zip(c.a.tokens, c.b.tokens)) if x != y]
        assert differ and c.divergence == differ[0]  # training changed the greedy output
        assert sum(c.a.lp_a) > sum(c.a.lp_b)  # each model prefers its own greedy text
        assert sum(c.b.lp_b) > sum(c.b.lp_a)
    assert view.divergences == [c.divergence for c in view.comparisons]
    assert view.texts[0] == (view.comparisons[0].a.text, view.comparisons[0].b.text)

    page = view._repr_html_()
    assert page.count('class="wb-compare-item"') == 2 and page.count("wb-token wb-diverge") == 4  # both sides
    c = view.comparisons[0]
    title = html.escape(f"#0 | id {c.a.tokens[0]}", quote=True)
    assert title in page
    assert html.escape(f"logprob A {c.a.lp_a[0]:.4g} | logprob B {c.a.lp_b[0]:.4g}", quote=True) in page
    assert "first divergence" in page and "base (tiny-qwen3)" in page
    bundle = view._repr_mimebundle_()
    assert bundle["text/html"] == page and bundle["text/plain"] == repr(view)
    assert "diverge at token" in repr(view) and "\u2016" in repr(view)


def test_two_checkpoints_by_path(ip):
    """Two sampler checkpoints of one run, named by a variable holding a path and by a path:
    each side samples what that checkpoint samples alone; the divergence is where the token
    lists first differ (None if they do not)."""
    service = service_of(ip)
    client = service.create_lora_training_client("tiny-qwen3", rank=4, seed=1)
    train(client, GREEN, 2)
    ip.user_ns["early"] = early = client.save_weights_for_sampler("early").result().path
    train(client, RED, 4)
    late = client.save_weights_for_sampler("late").result().path
    view = ip.run_line_magic("tinker", f"compare early {late} --prompts qs {GREEDY}")
    assert view.labels == ("early", late)
    tok = client.get_tokenizer()
    for c, text in zip(view.comparisons, ip.user_ns["qs"]):
        prompt = types.ModelInput.from_ints(tok.encode(text, add_special_tokens=False))
        assert c.a.tokens == greedy(service.create_sampling_client(model_path=early), prompt).tokens
        assert c.b.tokens == greedy(service.create_sampling_client(model_path=late), prompt).tokens
        differ = [i for i, (x, y) in enumerate(zip(c.a.tokens, c.b.tokens)) if x != y]
        assert c.divergence == (differ[0] if differ else None)


def test_first_divergence_and_its_mark():
    """The index where two token lists part (or where the shorter one ends), and the view
    ringing that token on both sides, with both logprobs on hover; no server needed."""
    from kernel_ext.compare_view import Comparison, CompareView, Generation, first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([5], [6, 7]) == 0
    assert first_divergence([1, 2], [1, 2, 9]) == 2
    assert first_divergence([1, 2], [1, 2]) is None and first_divergence([], []) is None
    a = Generation([104, 105, 33], [-0.1, -0.2, -0.3], [-1.0, -2.0, -3.0], "hi!", "stop")
    b = Generation([104, 105, 63, 63], [-0.1, -0.2, -4.0, -5.0], [-1.0, -2.0, -0.5, -0.6], "hi??", "length")
    view = CompareView([Comparison("say hi", [1, 2], a, b, first_divergence(a.tokens, b.tokens))], ("x", "y"))
    page = view._repr_html_()
    marked = [part for part in page.split("<span ")[1:] if "wb-diverge" in part.split(">")[0]]
    assert len(marked) == 2 and 'data-id="33"' in marked[0] and 'data-id="63"' in marked[1]
    assert html.escape("#2 | id 33 | text '<33>' | logprob A -0.3 | logprob B -3 | A - B 2.7 | first divergence",
                       quote=True) in marked[0]
    assert "first divergence at token 2" in page and "A = <b>x</b>" in page
    assert repr(view).splitlines()[1:] == [
        "[0] 'say hi': diverge at token 2 (marked \u2016)",
        "  A: '<104><105>\u2016<33>'  [stop, 3 tokens, sum logprob A -0.6 B -6]",
        "  B: '<104><105>\u2016<63><63>'  [length, 4 tokens, sum logprob A -9.3 B -4.1]"]


def test_identical_sides_have_no_divergence(ip, tc):
    """A SamplingClient against its own checkpoint path, sampling at temperature 1: the same
    weights and the same seed give the same tokens."""
    sc = tc.save_weights_and_get_sampling_client()
    ip.user_ns["sc"] = sc
    view = ip.run_line_magic("tinker", f"compare sc {sc.model_path} --prompts qs --max-tokens 6 --seed 3")
    assert view.params.seed == 3 and view.divergences == [None, None]
    for c in view.comparisons:
        assert c.a.tokens == c.b.tokens and c.a.lp_a == pytest.approx(c.a.lp_b, abs=1e-5)
    assert "wb-diverge" not in view._repr_html_() and "identical" in repr(view)
    drawn = ip.run_line_magic("tinker", "compare sc sc --prompts qs --max-tokens 6")
    assert drawn.params.seed is not None and drawn.divergences == [None, None]  # one seed, both sides


def test_token_prompts_and_model_inputs(ip, tc):
    tok = tc.get_tokenizer()
    ids = tok.encode("the sky is", add_special_tokens=False)
    ip.user_ns.update(ids=ids, mi=types.ModelInput.from_ints(ids))
    view = ip.run_line_magic("tinker", f"compare tc base --prompts '[ids, mi]' {GREEDY}")
    assert [c.prompt_tokens for c in view.comparisons] == [ids, ids]
    assert view.comparisons[0].prompt == tok.decode(ids)
    assert view.comparisons[0].a.tokens == view.comparisons[1].a.tokens
    one = ip.run_line_magic("tinker", f"compare tc base --prompts ids {GREEDY}")  # one token list: one prompt
    assert len(one.comparisons) == 1


def test_chat_prompts_go_through_the_renderer(ip, tc):
    """--chat asks each string as a user turn in the model's chat template and stops at the
    renderer's stop sequences: the same tokens as sampling the rendered prompt by hand."""
    view = ip.run_line_magic("tinker", "compare tc base --prompts \"'Hi there'\" --chat --max-tokens 6 --temperature 0")
    renderer = renderers.get_renderer(renderers.get_recommended_renderer_name("tiny-qwen3"), tc.get_tokenizer())
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Hi there"}])
    c = view.comparisons[0]
    assert c.prompt == "Hi there" and c.prompt_tokens == prompt.to_ints()
    stop = renderer.get_stop_sequences()
    assert c.a.tokens == greedy(tc.save_weights_and_get_sampling_client(), prompt, 6, stop).tokens
    base = service_of(ip).create_sampling_client(base_model="tiny-qwen3")
    assert c.b.tokens == greedy(base, prompt, 6, stop).tokens
    assert view.params.stop == stop


@pytest.mark.parametrize("line, message", [
    ("compare nope base --prompts qs", "cannot evaluate side A 'nope': NameError"),
    ("compare tc nope --prompts qs", "cannot evaluate side B 'nope'"),
    ("compare base base --prompts qs", "both sides are `base`"),
    ("compare tc base", "the following arguments are required: --prompts"),
    ("compare tc base --prompts []", "the list of prompts is empty"),
    ("compare tc base --prompts \"['']\"", "prompt 0 is empty"),
    ("compare tc base --prompts 42", "got a int"),
    ("compare tc base --prompts '[3.5]'", "prompt 0 is a float"),
    ("compare qs base --prompts qs", "side A (qs) is a list; expected a SamplingClient"),
    ("compare wb://run-nope/sampler_weights/x base --prompts qs",
     "side A (wb://run-nope/sampler_weights/x): training run 'run-nope' not found"),
    ("compare tc wb://bad-path --prompts qs", "side B (wb://bad-path): bad checkpoint path"),
    ("compare tc base --prompts qs --renderer zz", "compare --chat: unknown renderer 'zz'"),
    ("compare tc base --prompts qs --max-tokens 0", "must be >= 1"),
])
def test_bad_input_raises_a_usage_error_naming_it(ip, tc, line, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ip.run_line_magic("tinker", line)
