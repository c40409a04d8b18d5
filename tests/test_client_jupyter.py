"""Futures inside a real, running Jupyter kernel (ipykernel through jupyter_client): submit
forward_backward and optim_step back to back, `.result()` in a cell, and top-level `await`.
The kernel's numbers must equal the same steps run here, in a plain script context."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench import types

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

DATA = [[5, 17, 230, 41, 9, 77], [300, 12, 8, 1999, 4]]

SETUP = """
import json
import workbench as wb
from workbench import types
service = wb.ServiceClient(base_url={url!r}, api_key={key!r})
training = service.create_lora_training_client("tiny-qwen3", rank=4, seed=9)
data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                    loss_fn_inputs={{"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}})
        for s in {data!r}]
"""

BACK_TO_BACK = """
fb = training.forward_backward(data, "cross_entropy")
step = training.optim_step(types.AdamParams(learning_rate=1e-2))  # before waiting
print("RESULT", json.dumps({"fb": fb.result(timeout=120).metrics["loss:sum"],
                            "step": step.result(timeout=120).metrics is not None}))
"""

TOP_LEVEL_AWAIT = """
after = await training.forward(data, "cross_entropy")
inner = await training.forward_backward_async(data, "cross_entropy")  # Tinker 0.38: a future
fb2 = await inner
print("AWAIT", json.dumps({"after": after.metrics["loss:sum"], "fb2": fb2.metrics["loss:sum"]}))
"""


def run_cell(client, code: str) -> str:
    out: list[str] = []
    errors: list[str] = []

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            errors.append("\n".join(content["traceback"]))

    reply = client.execute_interactive(code, timeout=180, output_hook=hook)
    assert reply["content"]["status"] == "ok" and not errors, "\n".join(errors)
    return "".join(out)


def tagged(text: str, tag: str) -> dict:
    line = next(line for line in text.splitlines() if line.startswith(tag + " "))
    return json.loads(line[len(tag) + 1:])


def test_futures_in_a_running_jupyter_kernel(server, service):
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        run_cell(client, SETUP.format(url=server.url, key=server.api_key, data=DATA))
        first = tagged(run_cell(client, BACK_TO_BACK), "RESULT")
        second = tagged(run_cell(client, TOP_LEVEL_AWAIT), "AWAIT")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)

    # The same steps in this (script) process, on a run with the same seed.
    training = service.create_lora_training_client("tiny-qwen3", rank=4, seed=9)
    data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                        loss_fn_inputs={"target_tokens": s[1:], "weights": np.ones(len(s) - 1)}) for s in DATA]
    fb = training.forward_backward(data, "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result(120)
    after = training.forward(data, "cross_entropy").result(120)
    assert first == {"fb": fb.result(120).metrics["loss:sum"], "step": True}
    assert second["after"] == after.metrics["loss:sum"] < first["fb"]
    assert second["fb2"] == second["after"]  # no optim_step in between: same weights


EMBEDDED = """
import os
os.environ.pop("WORKBENCH_URL", None)
import workbench as wb
service = wb.ServiceClient()
print("LOG", json.dumps({"log": service.local_server.log_path,
                         "models": [m.model_name for m in service.get_server_capabilities().supported_models]}))
service.local_server.stop()
"""


def test_an_embedded_server_in_a_kernel_logs_to_a_file_not_to_red_stderr_boxes():
    """A kernel shows a subprocess's stderr as red boxes in whatever cell runs: the embedded
    server's start-up line there reads as an error. In a kernel its log goes to a file."""
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.start_kernel(env={k: v for k, v in __import__("os").environ.items() if k != "WORKBENCH_URL"}
                         | {"WORKBENCH_LOCAL_MODELS": "tiny-qwen3"})
    client = manager.client()
    client.start_channels()
    stderr: list[str] = []
    try:
        client.wait_for_ready(timeout=120)
        run_cell(client, "import json")
        out = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                (stderr if msg["content"]["name"] == "stderr" else out).append(msg["content"]["text"])
            assert msg["msg_type"] != "error", msg["content"]

        reply = client.execute_interactive(EMBEDDED, timeout=180, output_hook=hook)
        assert reply["content"]["status"] == "ok"
        found = tagged("".join(out), "LOG")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert stderr == []
    assert "tiny-qwen3" in found["models"]
    with open(found["log"]) as f:
        assert "[workbench-server]" in f.read()  # the start-up line went to the file
