"""%tinker magics through IPython's shell against a real server (tiny model, real ZeroMQ)."""

from __future__ import annotations

import threading
import time

import pytest
from IPython.core.error import UsageError

from workbench import types

from conftest import ipython_shell


@pytest.fixture(scope="module")
def ip(server):
    shell = ipython_shell()
    shell.run_line_magic("load_ext", "kernel_ext")
    shell.run_line_magic("tinker", f"connect {server.url} --key {server.api_key}")
    yield shell
    shell.run_line_magic("tinker", "stop")


def shifted(tokens: list[int], n_prompt: int) -> types.Datum:
    weights = [0.0] * (n_prompt - 1) + [1.0] * (len(tokens) - n_prompt)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


@pytest.fixture(scope="module")
def training(ip):
    magics = ip.magics_manager.registry["TinkerMagics"]
    client = magics.session.service.create_lora_training_client("tiny-qwen3", rank=4, seed=0)
    tok = client.get_tokenizer()
    ids = tok.encode("the sky is blue and the grass is green", add_special_tokens=False)
    data = [shifted(ids, 4), shifted(ids[:6], 2)]
    ip.user_ns.update(tc=client, data=data, batches=[data])
    return client


def test_help_documents_every_subcommand(ip):
    from kernel_ext import magics

    doc = ip.find_line_magic("tinker").__doc__
    assert doc == magics.__doc__
    for name in ("start", "stop", "connect", "status", "models", "runs", "checkpoints", "watch",
                 "inspect", "step", "rewind", "rollouts", "monitor", "sample", "plot", "compare"):
        assert f"%tinker {name}" in doc, name


@pytest.mark.parametrize("line, message", [
    ("", "needs a subcommand"),
    ("fly", "invalid choice: 'fly'"),
    ("sample tc 'hi' --n 0", "must be >= 1"),
    ("step tc", "--batches"),
    ("watch nothing_here", "cannot evaluate training client 'nothing_here'"),
    ("watch data", "is a list, not a TrainingClient"),
    ("inspect 42", "expected a Datum"),
    ("step tc --batches data[0].model_input", "got ModelInput"),
    ("sample tc 'unclosed", "cannot parse"),
    ("rollouts \"[{'samples': [{'advantage': 1}]}]\"", "sample 0 has no reward"),
    ("inspect \"[{'role': 'user', 'content': 'hi'}]\"", "needs --renderer"),
    ("fly", "%tinker: argument SUBCOMMAND"),
    ("step tc --batches batches --lr -1", "%tinker step: argument --lr: must be >= 0"),
    ("rewind tc 0", "must be >= 1"),
    ("rewind data", "is a list, not a TrainingClient"),
])
def test_bad_input_raises_a_usage_error_naming_it(ip, training, line, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ip.run_line_magic("tinker", line)


def test_status_and_models(ip, server):
    status = ip.run_line_magic("tinker", "status")
    assert server.url in repr(status) and "tiny-qwen3" in repr(status)
    assert "tiny-qwen3" in ip.run_line_magic("tinker", "models")._repr_html_()


def test_watch_draws_a_real_training_run(ip, training):
    curve = ip.run_line_magic("tinker", "watch tc")
    for _ in range(3):
        fb = training.forward_backward(ip.user_ns["data"], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        expected = fb.result().metrics["loss:sum"]
    training.forward(ip.user_ns["data"], "cross_entropy").result()
    curve.flush()
    raw, smooth, evals = curve.fig.data
    assert list(raw.x) == [0.0, 1.0, 2.0] and raw.y[-1] == pytest.approx(expected)
    assert raw.y[-1] < raw.y[0]  # it learns
    assert list(evals.x) == [3.0]
    # Above the figure: the run's facts, the server's count of trainable LoRA parameters included.
    assert f"trainable {training.trainable_parameters:,}" in curve.info.value and training.trainable_parameters > 0
    assert "base model tiny-qwen3" in curve.info.value and "LoRA rank 4" in curve.info.value
    assert training._service.base_url in curve.info.value
    assert curve.slider.value == 0.9 and curve.widget.children[-1] is curve.fig
    curve.close()


def test_inspect_scores_and_diffs_after_training(ip, training):
    view = ip.run_line_magic("tinker", "inspect data --client tc")
    assert view.body.value.count('class="wb-token"') == len(ip.user_ns["data"][0].model_input.to_ints()) + 1
    view.score_button.click()
    assert view.wait_scored(60) and view.error is None
    training.forward_backward(ip.user_ns["data"], "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    view.score_button.click()
    assert view.wait_scored(60)
    view.mode.value = "diff"
    assert "change" in view.body.value and view.logprobs[0] != view.before[0]
    # The inspector's logprobs are the server's, for exactly these tokens.
    out = training.forward(ip.user_ns["data"][:1], "cross_entropy").result()
    assert view.logprobs[0] == pytest.approx(out.loss_fn_outputs[0]["logprobs"].tolist(), abs=1e-6)
    assert "[[" in repr(view)  # the terminal fallback marks trained tokens
    view.close()


def test_step_panel_buttons_run_in_the_background(ip, training):
    gate = threading.Event()

    def held_back_batches():  # the first batch comes only when the test opens the gate
        gate.wait(120)
        while True:
            yield ip.user_ns["data"]

    ip.user_ns["held_back"] = held_back_batches()
    panel = ip.run_line_magic("tinker", "step tc --batches held_back --lr 0.01")
    start_step = panel.step
    clicker = threading.Thread(target=panel.step_button.click)
    clicker.start()
    clicker.join(60)
    # The click returned although its step cannot even have its batch yet: it only
    # enqueued the work (a click that ran the step itself would still be waiting here).
    assert not clicker.is_alive() and not gate.is_set()
    assert not panel.wait_idle(0.2) and panel.step == start_step
    gate.set()
    assert panel.wait_idle(60) and panel.error is None
    panel.flush()
    assert panel.step == start_step + 1
    assert f'wb-step-count">{start_step + 1}<' in panel.info.value
    panel.toggle_pause()
    panel.run_count.value = 2
    panel.run_button.click()
    time.sleep(0.3)
    assert panel.step == start_step + 1 and panel.paused  # paused: the run waits
    panel.toggle_pause()
    assert panel.wait_idle(60) and panel.error is None
    assert panel.step == start_step + 3 and panel.pending == 0 and panel.last_loss is not None
    panel.close()


def test_step_panel_undo_and_the_rewind_magic(ip, training):
    """The panel's undo button rewinds one optim_step through its worker (the step count
    goes back); `%tinker rewind tc N` rewinds N; beyond the server's depth it is refused."""
    panel = ip.run_line_magic("tinker", "step tc --batches batches --lr 0.01 --run-n 2")
    panel.run_button.click()
    assert panel.wait_idle(60) and panel.error is None
    start = panel.step
    assert start == training.optim_steps and start >= 2
    panel.undo_button.click()
    assert panel.wait_idle(60) and panel.error is None
    panel.flush()
    assert panel.step == training.optim_steps == start - 1
    assert f'wb-step-count">{start - 1}<' in panel.info.value
    view = ip.run_line_magic("tinker", "rewind tc 1")
    assert repr(view).startswith("rewound tc by 1 optim_step: the run is at step")
    assert training.optim_steps == start - 2
    panel.flush()
    assert panel.step == start - 2
    with pytest.raises(UsageError, match=r"cannot rewind 99 optim_steps: \d+ can be undone"):
        ip.run_line_magic("tinker", "rewind tc 99")
    assert training.optim_steps == start - 2
    panel.step_button.click()  # training goes on from there
    assert panel.wait_idle(60) and panel.error is None and panel.step == start - 1
    panel.close()


def test_sample_and_monitor_see_the_server(ip, training):
    monitor = ip.run_line_magic("tinker", "monitor")
    time.sleep(0.3)  # let the SUB socket connect before the cycles we want to see
    view = ip.run_line_magic("tinker", "sample tc 'the sky is' --n 2 --max-tokens 5 --temperature 0")
    assert len(view.response.sequences) == 2
    assert all(len(seq.logprobs) == len(seq.tokens) for seq in view.response.sequences)
    assert view.texts[0] == view.texts[1]  # greedy
    assert 'class="wb-completion"' in view._repr_html_()
    # The 0.3 s above is a hope, not a guarantee: the event stream's thread connects (with a
    # CURVE handshake) in the background, and a loaded machine may take longer, so the sample's
    # cycle event can be published before the subscription is there. Then sample again, each
    # 2 s without a cycle, rather than fail on PUB/SUB's slow joiner.
    deadline = time.monotonic() + 30
    retry_at = time.monotonic() + 2
    while not monitor.cycles and time.monotonic() < deadline:
        if time.monotonic() > retry_at:
            ip.run_line_magic("tinker", "sample tc 'the sky is' --n 1 --max-tokens 1 --temperature 0")
            retry_at = time.monotonic() + 2
        time.sleep(0.05)
    monitor.flush()
    assert monitor.cycles and monitor.latest["tenants"] >= 1
    assert len(monitor.fig.data[0].y) == len(monitor.cycles)


def test_cell_magic_sample(ip, training):
    ip.run_cell("%%tinker sample tc --max-tokens 3 --temperature 0\nthe grass is\n")
    result = ip.user_ns["_"]
    assert result.prompt == "the grass is" and len(result.response.sequences[0].tokens) <= 3


def test_sample_a_chat_prompt_through_the_models_renderer(ip, training):
    """--chat asks the prompt as a user turn in the model's chat template and stops at the
    end of the assistant's turn: the same tokens as sampling the rendered prompt by hand."""
    from workbench import renderers, types

    view = ip.run_line_magic("tinker", "sample tc 'Hi there' --chat --max-tokens 6 --temperature 0")
    renderer = renderers.get_renderer(renderers.get_recommended_renderer_name("tiny-qwen3"), training.get_tokenizer())
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "Hi there"}])
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=renderer.get_stop_sequences())
    by_hand = training.save_weights_and_get_sampling_client().sample(prompt, 1, params).result()
    assert view.response.sequences[0].tokens == by_hand.sequences[0].tokens
    with pytest.raises(UsageError, match="--chat: .*no-such"):
        ip.run_line_magic("tinker", "sample tc 'Hi' --renderer no-such")


def test_rollouts_from_a_list(ip):
    ip.user_ns["groups"] = [
        {"samples": [{"reward": 1.0, "logprobs": [-0.2, -1.5]}, {"reward": 0.0, "logprobs": [-3.0]}]},
        {"samples": [{"reward": 0.5}, {"reward": 0.5}]},
    ]
    dash = ip.run_line_magic("tinker", "rollouts groups")
    assert [g.zero_variance for g in dash.groups] == [False, True]
    assert "zero variance" in dash.body_html
    dash.close()


def test_runs_and_checkpoints_use_the_rest_client(ip, training):
    training.save_state("kx").result()
    runs = ip.run_line_magic("tinker", "runs")
    assert training.model_id in repr(runs)
    checkpoints = ip.run_line_magic("tinker", f"checkpoints {training.model_id}")
    assert "kx" in repr(checkpoints)


def test_start_and_stop_the_embedded_server(ip, monkeypatch):
    from kernel_ext.magics import TinkerMagics

    monkeypatch.delenv("WORKBENCH_URL", raising=False)
    magics = TinkerMagics(ip)  # its own session, so the module's connection stays as it is
    service = magics.tinker("start --models tiny-qwen3")
    assert service.local_server is not None and service.local_server.process.poll() is None
    assert "True" in repr(magics.tinker("status"))  # embedded
    message = magics.tinker("stop")
    assert "stopped the embedded server" in repr(message)
    assert service.local_server.process.poll() is not None
    with pytest.raises(UsageError, match="not connected"):
        magics.tinker("status")


def test_stop_leaves_the_widgets_on_screen_frozen(ip, monkeypatch):
    """A notebook's record survives `%tinker stop`: the monitor keeps every cycle it drew and the
    step panel its figures, but nothing listens any more and the panel's buttons are off."""
    from kernel_ext.magics import TinkerMagics

    monkeypatch.delenv("WORKBENCH_URL", raising=False)
    magics = TinkerMagics(ip)
    service = magics.tinker("start --models tiny-qwen3")
    client = service.create_lora_training_client("tiny-qwen3", rank=4, seed=0)
    ids = client.get_tokenizer().encode("one two three four five six", add_special_tokens=False)
    ip.user_ns.update(stop_tc=client, stop_batch=[shifted(ids, 3)])
    monitor = magics.tinker("monitor")
    panel = magics.tinker("step stop_tc --batches stop_batch --lr 0.01 --run-n 3")
    assert panel.run_count.value == 3
    panel.enqueue("run", 3)
    assert panel.wait_idle(120)
    deadline = time.monotonic() + 10
    while not monitor.cycles and time.monotonic() < deadline:
        time.sleep(0.05)
    cycles = len(monitor.cycles)
    assert cycles >= 1 and panel.step == 3
    magics.tinker("stop")
    assert monitor.widget.comm is not None and panel.widget.comm is not None  # not closed
    assert len(monitor.cycles) == cycles and monitor.stream is None
    assert all(b.disabled for b in (panel.fb_button, panel.step_button, panel.run_button))
    assert 'wb-step-count">3<' in panel.info.value and "disconnected" in panel.info.value
    with pytest.raises(RuntimeError, match="disconnected"):
        panel.enqueue("step")
    panel.close()
    monitor.close()
    assert panel.widget.comm is None


def test_inspect_a_conversation_through_a_renderer(ip, training):
    from workbench.renderers import get_renderer

    chat = [{"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "Blue."}]
    ip.user_ns["chat"] = chat
    view = ip.run_line_magic("tinker", "inspect chat --renderer qwen3 --client tc")
    model_input, weights = get_renderer("qwen3", training.get_tokenizer()).build_supervised_example(chat)
    rows = view.rows[0]
    assert [r.id for r in rows] == model_input.to_ints()
    assert [r.weight for r in rows[1:]] == [float(w) for w in weights[1:]]
    assert "Blue." in "".join(r.text for r in rows if r.weight)
    assert any(r.special for r in rows)  # the chat template's special tokens are marked
    view.close()
    with pytest.raises(UsageError, match="unknown renderer"):
        ip.run_line_magic("tinker", "inspect chat --renderer nope --client tc")
