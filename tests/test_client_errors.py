"""Every failure a user meets says what is wrong and what to do, tested on its message;
heartbeats keep a live session from being parked; a restarted server is reached again."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import workbench as wb
from workbench import types, wire
from workbench.connection import Connection
from workbench.errors import (
    AuthenticationError, ConnectionFailedError, InvalidRequestError, NotFoundError, ProtocolError,
)

from conftest import free_port, start_server

BASE = "tiny-qwen3"



def test_unreachable_server_names_url_and_how_to_start_one():
    url = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionFailedError) as err:
        wb.ServiceClient(base_url=url, api_key="k", connect_timeout=1.0)
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert url in message and "workbench-server --api-key" in message and "ServiceClient() with no URL" in message


def test_wrong_key(server):
    with pytest.raises(AuthenticationError, match="unknown API key; pass the key the server was started with"):
        wb.ServiceClient(base_url=server.url, api_key="not-the-key")


def test_protocol_version_mismatch(server, monkeypatch):
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", wire.PROTOCOL_VERSION + 98)
    with pytest.raises(ProtocolError, match=r"protocol version mismatch: client speaks 99, server speaks 1; "
                                            "install the same tinker-workbench version on both sides"):
        Connection(server.url, server.api_key, connect_timeout=30)


def test_unknown_model_lists_the_available_ones(service):
    with pytest.raises(NotFoundError) as err:
        service.create_lora_training_client("no-such-model", rank=4)
    assert "no-such-model" in str(err.value) and "tiny-qwen3" in str(err.value) and "tiny-llama" in str(err.value)
    assert err.value.category == "user"
    with pytest.raises(NotFoundError, match="tiny-qwen3"):
        service.create_sampling_client(base_model="no-such-model")


def test_request_failed_on_the_server_has_category_and_message(service):
    training = service.create_lora_training_client(BASE, rank=4, seed=0)
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10**6]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1, 1, 1]})
    with pytest.raises(InvalidRequestError) as err:
        training.forward([bad], "cross_entropy").result(60)
    assert err.value.category == "user" and err.value.where == "data[0].model_input"
    assert "token id 1000000 is outside the vocabulary" in str(err.value)
    with pytest.raises(NotFoundError, match="checkpoint 'wb://run-000000000000/weights/x' not found|"
                                            "training run 'run-000000000000' not found") as err:
        training.load_state("wb://run-000000000000/weights/x").result(60)
    assert err.value.category == "user"
    with pytest.raises(InvalidRequestError, match=r"(?s)bad adam_params: .*learning_rate must be >= 0, got -1.0"):
        training._connection.call("optim_step", {"model_id": training.model_id,
                                                 "adam_params": {"learning_rate": -1.0}}).result(60)


def test_timeout_is_a_clear_timeout_error(service):
    training = service.create_lora_training_client(BASE, rank=4, seed=0)
    rng = np.random.default_rng(0)
    data = [types.Datum(model_input=types.ModelInput.from_ints(rng.integers(5, 3000, 64).tolist()),
                        loss_fn_inputs={"target_tokens": rng.integers(5, 3000, 64), "weights": np.ones(64)})]
    future = training.forward_backward(data, "cross_entropy")
    with pytest.raises(TimeoutError, match=r"no result within 0.001 s; the request is still queued or running"):
        future.result(timeout=0.001)
    assert future.result(timeout=120).metrics["loss:sum"] > 0  # the request itself went on


def test_heartbeats_keep_a_session_from_being_parked(tmp_path):
    """With a 1.5 s session timeout, a ServiceClient that heartbeats stays live while a run
    created without heartbeats (a raw connection) is parked."""
    running = start_server(tmp_path, "--models", BASE, "--session-timeout", "1.5")
    try:
        service = wb.ServiceClient(base_url=running.url, api_key=running.api_key)
        events: list[dict] = []  # the tenant's own session events, through its key
        stream = service.events(("session",))
        stream.subscribe(events.append)
        live = service.create_lora_training_client(BASE, rank=4, seed=0)
        silent = Connection(running.url, running.api_key)  # no sessions added: never beats
        silent_run = silent.call("create_model", {"base_model": BASE, "rank": 4, "session_id": "silent"}).result(60)
        time.sleep(4)  # the silent run is parked after 1.5-2.5 s
        parked = [event for event in list(events) if event["state"] == "parked"]
        assert [e["runs"] for e in parked] == [[silent_run["model_id"]]]
        assert service._connection.heartbeats_sent >= 6  # every 0.5 s: a third of the timeout
        assert service._connection._heartbeat_s == pytest.approx(0.5)
        assert live.forward([types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                                         loss_fn_inputs={"target_tokens": [2, 3], "weights": [1, 1]})],
                            "cross_entropy").result(60).metrics["loss:sum"] > 0
        stream.unsubscribe(events.append)
        silent.close()
    finally:
        running.stop(timeout=30)


def test_new_requests_reconnect_after_a_server_restart(tmp_path):
    port = free_port()
    first = start_server(tmp_path, "--models", BASE, "--port", str(port))
    try:
        assert first.url == f"tcp://127.0.0.1:{port}"
        service = wb.ServiceClient(base_url=first.url, api_key=first.api_key)
        state = service.create_lora_training_client(BASE, rank=4, seed=0).save_state("before").result(60).path
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: no clean shutdown
        first.process.wait()
    second = start_server(tmp_path, "--models", BASE, "--port", str(port))
    try:
        # The same ServiceClient, nothing re-created: its socket reconnects by itself.
        assert service.get_server_capabilities().supported_models
        resumed = service.create_training_client_from_state(state)
        assert resumed.base_model == BASE and resumed.lora_rank == 4
    finally:
        second.stop(timeout=30)
