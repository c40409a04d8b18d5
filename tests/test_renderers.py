"""Renderers against the built-in tiny tokenizers' own chat templates, token for token."""

from __future__ import annotations

import pytest

from server.tiny import load_tiny_tokenizer
from workbench.renderers import (
    TrainOnWhat, get_recommended_renderer_name, get_renderer, renderer_names,
)

SYSTEM = {"role": "system", "content": "You are terse."}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
    [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c d e"}, {"role": "assistant", "content": "f g"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": " lead and trail \n"}],
    [{"role": "user", "content": "Multi\nline\n\ntext"}, {"role": "assistant", "content": "x\ny\n\nz"}],
    [{"role": "user", "content": "unicode: héllo wörld ✓"}, {"role": "assistant", "content": "ça va ✓"}],
    [{"role": "user", "content": "think?"},
     {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nThe answer is 5."}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    [SYSTEM, {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "assistant", "content": "three"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    [{"role": "user", "content": "numbers 12345 67890"}, {"role": "assistant", "content": "1+1=2, 10*10=100."}],
]

PAIRS = [("tiny-qwen3", "qwen3"), ("tiny-llama", "llama3")]


@pytest.fixture(scope="module", params=PAIRS, ids=[p[1] for p in PAIRS])
def tok_renderer(request):
    model, name = request.param
    tokenizer = load_tiny_tokenizer(model)
    return tokenizer, get_renderer(name, tokenizer)


def _hf(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_supervised_tokens_equal_chat_template(tok_renderer, conv):
    tokenizer, renderer = tok_renderer
    messages = CONVERSATIONS[conv]
    model_input, weights = renderer.build_supervised_example(messages, TrainOnWhat.ALL_MESSAGES)
    assert model_input.to_ints() == _hf(tokenizer, messages)
    assert len(weights) == model_input.length


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_generation_prompt_equals_chat_template(tok_renderer, conv):
    tokenizer, renderer = tok_renderer
    messages = CONVERSATIONS[conv]
    for cut in range(1, len(messages) + 1):
        prefix = messages[:cut]
        expected = _hf(tokenizer, prefix, add_generation_prompt=True)
        assert renderer.build_generation_prompt(prefix).to_ints() == expected, cut


def test_disable_thinking_matches_template_flag():
    tokenizer = load_tiny_tokenizer("tiny-qwen3")
    renderer = get_renderer("qwen3_disable_thinking", tokenizer)
    for messages in CONVERSATIONS:
        prompt = messages[:-1]
        expected = _hf(tokenizer, prompt, add_generation_prompt=True, enable_thinking=False)
        assert renderer.build_generation_prompt(prompt).to_ints() == expected
        if "<think>" not in messages[-1]["content"]:
            model_input, _ = renderer.build_supervised_example(messages)
            assert model_input.to_ints() == _hf(tokenizer, messages)
    # The empty think block is in the prompt, so it is given, not trained.
    model_input, weights = renderer.build_supervised_example(CONVERSATIONS[0])
    trained = [t for t, w in zip(model_input.to_ints(), weights) if w]
    assert tokenizer.decode(trained) == "5<|im_end|>"
    with pytest.raises(ValueError, match="reasoning"):
        renderer.build_supervised_example(CONVERSATIONS[7])


def _trained_text(tokenizer, renderer, messages, what):
    model_input, weights = renderer.build_supervised_example(messages, what)
    assert set(weights) <= {0.0, 1.0}
    tokens = model_input.to_ints()
    runs, run = [], []
    for tok, w in zip(tokens, weights):
        if w:
            run.append(tok)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


def test_weights_select_trained_turns_qwen3():
    tokenizer = load_tiny_tokenizer("tiny-qwen3")
    renderer = get_renderer("qwen3", tokenizer)
    messages = CONVERSATIONS[2]  # system, user a, assistant b, user c d e, assistant f g
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.LAST_ASSISTANT_MESSAGE) == [
        "<think>\n\n</think>\n\nf g<|im_end|>"]
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.ALL_ASSISTANT_MESSAGES) == [
        "b<|im_end|>", "<think>\n\n</think>\n\nf g<|im_end|>"]
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.ALL_MESSAGES) == [
        "You are terse.<|im_end|>", "a<|im_end|>", "b<|im_end|>", "c d e<|im_end|>",
        "<think>\n\n</think>\n\nf g<|im_end|>"]
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES) == [
        "You are terse.<|im_end|>", "a<|im_end|>", "c d e<|im_end|>"]
    everything = renderer.build_supervised_example(messages, TrainOnWhat.ALL_TOKENS)[1]
    assert all(w == 1.0 for w in everything)
    custom = [dict(m, trainable=(i == 1)) for i, m in enumerate(messages)]
    assert _trained_text(tokenizer, renderer, custom, TrainOnWhat.CUSTOMIZED) == ["a<|im_end|>"]


def test_weights_select_trained_turns_llama3():
    tokenizer = load_tiny_tokenizer("tiny-llama")
    renderer = get_renderer("llama3", tokenizer)
    messages = CONVERSATIONS[9]  # system, user, assistant two, assistant three
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.LAST_ASSISTANT_MESSAGE) == ["three<|eot_id|>"]
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.LAST_ASSISTANT_TURN) == [
        "two<|eot_id|>", "three<|eot_id|>"]
    assert _trained_text(tokenizer, renderer, CONVERSATIONS[2], TrainOnWhat.LAST_ASSISTANT_TURN) == [
        "f g<|eot_id|>"]
    assert _trained_text(tokenizer, renderer, CONVERSATIONS[2], TrainOnWhat.ALL_ASSISTANT_MESSAGES) == [
        "b<|eot_id|>", "f g<|eot_id|>"]
    # Only the output is trained: the header before "two" and the BOS keep weight 0.
    model_input, weights = renderer.build_supervised_example(messages, TrainOnWhat.ALL_MESSAGES)
    assert weights[0] == 0.0 and model_input.to_ints()[0] == tokenizer.bos_token_id


def test_bad_selection_and_messages_raise_clear_errors():
    tokenizer = load_tiny_tokenizer("tiny-qwen3")
    renderer = get_renderer("qwen3", tokenizer)
    with pytest.raises(ValueError, match="selects no message"):
        renderer.build_supervised_example([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="CUSTOMIZED"):
        renderer.build_supervised_example([{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "x", "trainable": True}])
    with pytest.raises(ValueError, match=r"messages\[1\].content"):
        renderer.build_supervised_example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}])
    with pytest.raises(ValueError, match="unknown renderer 'chatml'"):
        get_renderer("chatml", tokenizer)
    with pytest.raises(ValueError, match="single token"):
        get_renderer("llama3", tokenizer).get_stop_sequences()


@pytest.mark.parametrize("model,name", [("tiny-qwen3", "qwen3"), ("tiny-qwen3", "qwen3_disable_thinking"),
                                        ("tiny-llama", "llama3"), ("tiny-qwen3", "role_colon"),
                                        ("tiny-llama", "role_colon")])
def test_parse_response_round_trips_and_prefix_property(model, name):
    tokenizer = load_tiny_tokenizer(model)
    renderer = get_renderer(name, tokenizer)
    for messages in CONVERSATIONS:
        if name == "qwen3_disable_thinking" and "<think>" in messages[-1]["content"]:
            continue
        model_input, weights = renderer.build_supervised_example(messages)
        tokens = model_input.to_ints()
        prompt = renderer.build_generation_prompt(messages[:-1]).to_ints()
        # qwen3_disable_thinking: see its footgun note. Qwen3 frames a trailing assistant
        # message in a prompt but not in history (has_extension_property is False).
        consecutive_assistants = len(messages) > 1 and messages[-2]["role"] == "assistant"
        if name != "qwen3_disable_thinking" and (renderer.has_extension_property or not consecutive_assistants):
            # What the model is trained on continues exactly the prompt it will be sampled from,
            # and everything after the prompt is trained, up to the end-of-turn marker
            # (Qwen's template writes an untrained "\n" after <|im_end|>).
            assert tokens[: len(prompt)] == prompt
            trained = [i for i, w in enumerate(weights) if w]
            assert trained == list(range(len(prompt), trained[-1] + 1))
            assert tokenizer.decode(tokens[trained[-1] + 1:]) == ("\n" if name == "qwen3" else "")
        completion = [t for t, w in zip(tokens, weights) if w]
        message, ok = renderer.parse_response(completion)
        assert ok
        expected = messages[-1]["content"]
        if name == "llama3":
            expected = expected.strip()  # the template trims content
        if name.startswith("qwen3") and "</think>" not in expected:
            expected = expected.lstrip("\n")
        if "</think>" in expected:  # reasoning comes back in the template's framing
            reasoning, answer = expected.split("</think>")
            expected = "<think>\n" + reasoning.split("<think>")[-1].strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
        assert message == {"role": "assistant", "content": expected}
        # A response cut before its end-of-turn marker parses, but not ok.
        assert renderer.parse_response(completion[:-2])[1] is False


def test_stop_sequences_end_the_turn():
    qwen, llama = load_tiny_tokenizer("tiny-qwen3"), load_tiny_tokenizer("tiny-llama")
    assert get_renderer("qwen3", qwen).get_stop_sequences() == [qwen.convert_tokens_to_ids("<|im_end|>")]
    assert get_renderer("llama3", llama).get_stop_sequences() == [llama.convert_tokens_to_ids("<|eot_id|>")]
    role_colon = get_renderer("role_colon", qwen)
    stop = role_colon.get_stop_sequences()
    assert stop == ["\n\nUser:"]
    # The trained completion ends with the stop string, so sampling stops right after the turn.
    model_input, weights = role_colon.build_supervised_example(CONVERSATIONS[0])
    completion = [t for t, w in zip(model_input.to_ints(), weights) if w]
    assert qwen.decode(completion) == " 5\n\nUser:"
    # Each chat template's stop token is the last trained token of every assistant turn.
    for tokenizer, name in ((qwen, "qwen3"), (llama, "llama3")):
        renderer = get_renderer(name, tokenizer)
        for messages in CONVERSATIONS:
            model_input, weights = renderer.build_supervised_example(messages)
            last_trained = max(i for i, w in enumerate(weights) if w)
            assert model_input.to_ints()[last_trained] in renderer.get_stop_sequences()


def test_role_colon_format_and_prefill():
    tokenizer = load_tiny_tokenizer("tiny-llama")
    renderer = get_renderer("role_colon", tokenizer)
    prompt = renderer.build_generation_prompt(CONVERSATIONS[1][:2], prefill=" Hel")
    assert tokenizer.decode(prompt.to_ints()) == "<|begin_of_text|>System: You are terse.\n\nUser: Hi\n\nAssistant: Hel"


def test_recommended_renderer_names(tmp_path):
    assert get_recommended_renderer_name("tiny-qwen3") == "qwen3"
    assert get_recommended_renderer_name("tiny-llama") == "llama3"
    assert get_recommended_renderer_name("Qwen/Qwen3-8B") == "qwen3"
    assert get_recommended_renderer_name("Qwen/Qwen3-30B-A3B-Instruct-2507") == "qwen3"
    assert get_recommended_renderer_name("meta-llama/Llama-3.1-8B-Instruct") == "llama3"
    assert get_recommended_renderer_name("meta-llama/Llama-3.2-1B") == "llama3"
    assert get_recommended_renderer_name("gpt2") == "role_colon"
    assert get_recommended_renderer_name("Qwen/Qwen2.5-7B") == "role_colon"
    (tmp_path / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 64}')
    assert get_recommended_renderer_name(str(tmp_path)) == "qwen3"
    assert set(renderer_names()) >= {"qwen3", "qwen3_disable_thinking", "llama3", "role_colon"}


# ---------------------------------------------------------------- SmolLM2 (real tokenizer)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's own tokenizer and chat template (from the built-in
    `smollm2-135m`; converted once per machine). Fails, with the install line, without it."""
    from server.engine.models import load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m")
    except ValueError as exc:
        missing = str(exc)
    else:
        return tokenizer, get_renderer("smollm2", tokenizer)
    pytest.fail(missing, pytrace=False)


def test_smollm2_tokens_equal_its_chat_template(smollm2):
    tokenizer, renderer = smollm2
    for messages in CONVERSATIONS:
        model_input, weights = renderer.build_supervised_example(messages, TrainOnWhat.ALL_MESSAGES)
        assert model_input.to_ints() == _hf(tokenizer, messages)
        assert len(weights) == model_input.length
        for cut in range(1, len(messages) + 1):
            prefix = messages[:cut]
            expected = _hf(tokenizer, prefix, add_generation_prompt=True)
            assert renderer.build_generation_prompt(prefix).to_ints() == expected, (messages, cut)


def test_smollm2_default_system_prompt_is_given_never_trained(smollm2):
    tokenizer, renderer = smollm2
    text = tokenizer.decode(renderer.build_generation_prompt(CONVERSATIONS[0][:1]).to_ints())
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                    "Face<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    # A conversation's own system message replaces it (the empty one included).
    for messages in (CONVERSATIONS[1], CONVERSATIONS[10]):
        assert "SmolLM" not in tokenizer.decode(renderer.build_supervised_example(messages)[0].to_ints())
    # An empty conversation: the template's loop never runs, so no system turn either.
    assert tokenizer.decode(renderer.build_generation_prompt([]).to_ints()) == "<|im_start|>assistant\n"
    messages = CONVERSATIONS[2]  # system, user a, assistant b, user c d e, assistant f g
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.LAST_ASSISTANT_MESSAGE) == ["f g<|im_end|>"]
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.ALL_ASSISTANT_MESSAGES) == [
        "b<|im_end|>", "f g<|im_end|>"]
    assert _trained_text(tokenizer, renderer, messages, TrainOnWhat.ALL_USER_AND_SYSTEM_MESSAGES) == [
        "You are terse.<|im_end|>", "a<|im_end|>", "c d e<|im_end|>"]
    no_system = CONVERSATIONS[0]
    assert _trained_text(tokenizer, renderer, no_system, TrainOnWhat.ALL_MESSAGES) == [
        "What is 2+3?<|im_end|>", "5<|im_end|>"]  # the default prompt is not a message
    assert all(w == 1.0 for w in renderer.build_supervised_example(no_system, TrainOnWhat.ALL_TOKENS)[1])


def test_smollm2_stops_parses_and_extends_its_prompts(smollm2):
    tokenizer, renderer = smollm2
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert renderer.get_stop_sequences() == [im_end] and tokenizer.eos_token_id == im_end
    for messages in CONVERSATIONS:
        model_input, weights = renderer.build_supervised_example(messages)
        tokens = model_input.to_ints()
        prompt = renderer.build_generation_prompt(messages[:-1]).to_ints()
        # The trained completion continues exactly the prompt it is sampled from, is trained
        # up to <|im_end|> (the stop token), and only the template's "\n" follows, untrained.
        assert tokens[: len(prompt)] == prompt
        trained = [i for i, w in enumerate(weights) if w]
        assert trained == list(range(len(prompt), len(tokens) - 1))
        assert tokens[trained[-1]] == im_end and tokenizer.decode(tokens[trained[-1] + 1:]) == "\n"
        completion = [t for t, w in zip(tokens, weights) if w]
        assert renderer.parse_response(completion) == ({"role": "assistant", "content": messages[-1]["content"]}, True)
        assert renderer.parse_response(completion[:-1])[1] is False  # cut before its end of turn


def test_smollm2_is_recommended_for_its_names(tmp_path):
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                 "/models/SmolLM2-135M-Instruct.Q4_1.gguf"):
        assert get_recommended_renderer_name(name) == "smollm2", name
    assert get_recommended_renderer_name("HuggingFaceTB/SmolLM-135M") == "role_colon"  # v1: other template
    assert get_recommended_renderer_name("/models/Qwen3-0.6B-Q8_0.gguf") == "qwen3"
    # A local directory (e.g. a converted GGUF file) by its chat template.
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 49152}')
    assert get_recommended_renderer_name(str(tmp_path)) == "role_colon"
    (tmp_path / "chat_template.jinja").write_text(
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}")
    assert get_recommended_renderer_name(str(tmp_path)) == "smollm2"
    assert "smollm2" in renderer_names()
