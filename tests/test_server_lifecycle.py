"""Server lifecycle over real processes: kill -9 + restart resumes from the store to the very
weights of a run that never stopped, SIGTERM saves every run and exits 0, and an exposed
bind warns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import workbench as wb
from workbench import types

from conftest import start_server
from server.store import Store

ADAM = types.AdamParams(learning_rate=1e-2, weight_decay=0.01)


def batch(seed: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        ids = rng.integers(1, 500, size=12).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                               loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(11)}))
    return out


def step(client, seed: int) -> None:
    client.forward_backward(batch(seed), "cross_entropy")
    client.optim_step(ADAM).result(60)


def weights(store: Path, uri: str) -> dict[str, np.ndarray]:
    run_id, kind, name = uri[len("wb://"):].split("/")
    return load_file(str(store / "runs" / run_id / kind / name / "adapter_model.safetensors"))


def test_kill_9_restart_resume_then_sigterm_saves_every_run(tmp_path):
    store = tmp_path / "store"
    first = start_server(tmp_path, "--models", "tiny-qwen3")
    try:
        service = wb.ServiceClient(base_url=first.url, api_key=first.api_key)
        client = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=7)
        for s in range(2):
            step(client, s)
        resume_from = client.save_state("step-2").result(60).path
        for s in range(2, 4):  # the run that never stops
            step(client, s)
        reference = client.save_state("step-4").result(60).path
        os.killpg(first.pid, signal.SIGKILL)
        first.process.wait(30)
    finally:
        first.stop()

    second = start_server(tmp_path, "--models", "tiny-qwen3")
    try:
        service = wb.ServiceClient(base_url=second.url, api_key=second.api_key)
        resumed = service.create_training_client_from_state_with_optimizer(resume_from)
        for s in range(2, 4):
            step(resumed, s)
        path = resumed.save_state("step-4").result(60).path
        # The killed server's runs and checkpoints are listed, and serve, after the restart.
        rest = service.create_rest_client()
        assert client.model_id in {r.training_run_id for r in rest.list_training_runs(limit=50).result(30).training_runs}
        assert {resume_from, reference} <= {c.path for c in rest.list_checkpoints(client.model_id).result(30).checkpoints}
        sampler = service.create_sampling_client(model_path=reference)
        assert sampler.compute_logprobs(types.ModelInput.from_ints([1, 2, 3])).result(60)[1] < 0
        # SIGTERM: the cycle under way finishes, queued work is answered, every run is saved.
        other = service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=8)
        step(other, 9)
        other_live = other.save_weights_for_sampler("live").result(60).path
        pending = resumed.forward(batch(1), "cross_entropy")
        os.killpg(second.pid, signal.SIGTERM)
        assert second.process.wait(60) == 0
        try:
            pending.result(30)  # ran in the last cycle ...
        except wb.WorkbenchError as exc:
            assert "shutting down" in str(exc)  # ... or was answered, never left hanging
    finally:
        second.stop(timeout=30)
    want, got = weights(store, reference), weights(store, path)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    for run_id, live in ((resumed.model_id, path), (other.model_id, other_live)):
        saved = f"wb://{run_id}/weights/autosave-shutdown"
        assert (store / "runs" / run_id / "weights" / "autosave-shutdown" / "optimizer.safetensors").exists()
        got, want = weights(store, saved), weights(store, live)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    listed = Store(store)
    old_run = client.model_id
    assert {old_run, resumed.model_id, other.model_id} <= {r["run_id"] for r in listed.list_runs("default")}
    names = {c["checkpoint_id"] for c in listed.list_checkpoints(old_run, "default")}
    assert {"weights/step-2", "weights/step-4"} <= names
    assert "weights/autosave-shutdown" not in names  # kill -9 saves nothing


def test_exposed_bind_without_keys_warns_loudly(tmp_path, capsys):
    env = {**os.environ, "WORKBENCH_API_KEY": "k"}
    cmd = [sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
           "--store", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().startswith("workbench-server ready url=")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "WARNING" in err and "0.0.0.0" in err and "--api-key" in err, err
    # The same check, in-process, for the binds that must stay quiet.
    from server.__main__ import build_parser, warn_if_exposed

    # An exposed bind is quiet only with an explicit key AND CURVE (test_curve.py checks the rest).
    for argv in (["--host", "127.0.0.1"], ["--host", "localhost"],
                 ["--host", "0.0.0.0", "--api-key", "explicit", "--curve-secret-file", "k"],
                 ["--host", "::", "--api-keys", "f.json", "--curve-secret-file", "k"]):
        args = build_parser().parse_args(argv)
        warn_if_exposed(args.host, args)
        assert capsys.readouterr().err == "", argv
    warn_if_exposed("::", build_parser().parse_args(["--host", "::"]))
    assert "WARNING" in capsys.readouterr().err


def test_one_wb_path_parser_for_the_sdk_and_the_store(tmp_path):
    """workbench.paths.parse_checkpoint_path is the only wb:// parser: the SDK's bad
    argument (a ValueError) and the server's InvalidRequestError at "path" are one error."""
    from workbench.errors import InvalidRequestError
    from workbench.paths import CheckpointPathError, parse_checkpoint_path

    assert parse_checkpoint_path("wb://run-1a/sampler_weights/step.2") == ("run-1a", "sampler_weights", "step.2")
    bad = ["tinker://run-1/weights/a", "wb://run-1/weights", "wb://run-1/optimizer/a", "wb://../weights/a",
           "wb://run-1/weights/..", "wb://run-1/weights/a/b", "wb://run 1/weights/a", None]
    for path in bad:
        with pytest.raises(CheckpointPathError, match=r"expected wb://<run_id>/weights/<name>") as info:
            parse_checkpoint_path(path)
        assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidRequestError)
        assert info.value.where == "path" and info.value.to_wire()["type"] == "InvalidRequestError"
    with pytest.raises(InvalidRequestError, match="bad checkpoint path") as info:
        Store(tmp_path).load_checkpoint("wb://../weights/x", "default")
    assert info.value.where == "path"


def test_an_embedded_server_that_fails_to_start_names_its_log(tmp_path):
    from workbench.local import LocalServer

    log = tmp_path / "server.log"
    # "exited with code 2" normally; on a heavily loaded box the launcher once saw the process
    # still alive when it gave up: either way the error must carry the log's tail.
    with pytest.raises(RuntimeError, match=r"(?s)(exited with code 2|was not ready within \d+ s); the end of its log "
                                           r".*server\.log.*--cycle-ms: invalid int"):
        LocalServer(store=str(tmp_path / "store"), extra_args=["--cycle-ms", "soon"], log=str(log),
                    startup_timeout=60)
    with pytest.raises(ValueError, match="log must be"):
        LocalServer(log=3)
