"""CURVE encryption (--curve-secret-file): a real server process over real ZeroMQ.

A client with the server's public key trains, samples and reads the event stream; clients
without it, or with a wrong one, get the clear "unreachable" error; plain ZeroMQ sockets get
nothing back at all (the evidence that the sockets really require the CURVE handshake).
"""

from __future__ import annotations

import os
import pickle
import stat
import time

import numpy as np
import pytest
import zmq

import workbench as wb
from workbench import types, wire
from workbench.connection import SERVER_KEY_ENV

from conftest import ipython_shell, start_server

FAIL_FAST_S = 1.5  # connect timeout for clients expected to get no answer


@pytest.fixture(scope="module")
def curve_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    secret_file = root / "keys" / "server.key"  # its folder does not exist yet either
    running = start_server(root, "--models", "tiny-qwen3", "--curve-secret-file", str(secret_file))
    running.secret_file = secret_file
    yield running
    running.stop(timeout=30)


@pytest.fixture(scope="module")
def curve_service(curve_server):
    return wb.ServiceClient(base_url=curve_server.url, api_key=curve_server.api_key,
                            server_public_key=curve_server.server_public_key)


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)


def _hello_frames(api_key: str) -> list:
    return wire.encode(wire.request("raw-1", "hello", api_key, {"client": "raw"}))


def test_key_files_and_ready_line(curve_server):
    public = curve_server.server_public_key
    assert public is not None and len(public) == 40
    secret_file = curve_server.secret_file
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert (secret_file.parent / "server.key.pub").read_text().strip() == public
    assert zmq.curve_public(secret_file.read_text().strip().encode()).decode() == public


def test_restart_with_the_same_secret_file_keeps_the_public_key(curve_server, tmp_path):
    again = start_server(tmp_path, "--curve-secret-file", str(curve_server.secret_file))
    try:
        assert again.server_public_key == curve_server.server_public_key
        service = wb.ServiceClient(base_url=again.url, api_key=again.api_key,
                                   server_public_key=again.server_public_key, connect_timeout=30)
        assert service.get_server_capabilities().max_lora_rank >= 1
    finally:
        again.stop(timeout=30)


def test_train_sample_and_events_through_curve(curve_service):
    # No key given: the stream gets the one of the ServiceClient that opens it.
    stream = curve_service.events()
    events: list[dict] = []
    stream.subscribe(events.append)
    plain = zmq.Context.instance().socket(zmq.SUB)  # no CURVE: must hear nothing
    plain.setsockopt(zmq.LINGER, 0)
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(curve_service.events_url)
    try:
        time.sleep(0.5)  # PUB/SUB slow joiner: let both subscriptions reach the server
        training = curve_service.create_lora_training_client(base_model="tiny-qwen3", rank=4, seed=0)
        tokenizer = training.get_tokenizer()
        ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1)})
        fb = training.forward_backward([datum], "cross_entropy")
        op = training.optim_step(types.AdamParams(learning_rate=1e-3))
        assert np.isfinite(fb.result(60).metrics["loss:sum"])
        op.result(60)
        sampler = training.save_weights_and_get_sampling_client("curve")
        res = sampler.sample(prompt=types.ModelInput.from_ints(ids[:3]), num_samples=1,
                             sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result(60)
        assert 1 <= len(res.sequences[0].tokens) <= 4
        deadline = time.monotonic() + 20
        while not any(e.get("topic") == "cycle" for e in events) and time.monotonic() < deadline:
            # The CURVE handshake may outlast the slow-joiner pause on a loaded machine: each
            # new request makes a new cycle event, one of which the joined stream hears.
            sampler.compute_logprobs(types.ModelInput.from_ints(ids[:3])).result(60)
            time.sleep(0.05)
        assert any(e.get("topic") == "cycle" and e.get("tenants") is not None for e in events), events
        assert plain.poll(300) == 0, "a SUB socket without CURVE received an event"
    finally:
        plain.close(0)
        stream.close()


def test_pickled_sampling_client_keeps_the_server_key(curve_service, curve_server):
    sampler = curve_service.create_sampling_client(base_model="tiny-qwen3")
    restored = pickle.loads(pickle.dumps(sampler))
    assert restored._connection.server_public_key == curve_server.server_public_key.encode()
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    prompt = types.ModelInput.from_ints([1, 2, 3])
    assert (restored.sample(prompt, 1, params).result(60).sequences[0].tokens
            == sampler.sample(prompt, 1, params).result(60).sequences[0].tokens)


def test_client_without_or_with_a_wrong_key_gets_a_clear_error(curve_server, curve_service, monkeypatch):
    url, api_key = curve_server.url, curve_server.api_key
    with pytest.raises(wb.ConnectionFailedError) as info:
        wb.ServiceClient(base_url=url, api_key=api_key, connect_timeout=FAIL_FAST_S)
    message = str(info.value)
    assert url in message and "--curve-secret-file" in message
    assert "server_public_key=" in message and SERVER_KEY_ENV in message

    wrong = zmq.curve_keypair()[0].decode()
    with pytest.raises(wb.ConnectionFailedError) as info:
        wb.ServiceClient(base_url=url, api_key=api_key, server_public_key=wrong,
                         connect_timeout=FAIL_FAST_S)
    assert wrong in str(info.value) and "may be wrong" in str(info.value)

    # The right key from the environment works (WORKBENCH_SERVER_KEY), ...
    monkeypatch.setenv(SERVER_KEY_ENV, curve_server.server_public_key)
    by_env = wb.ServiceClient(base_url=url, api_key=api_key, connect_timeout=10)
    assert by_env.server_public_key == curve_server.server_public_key
    # ... and an explicit argument wins over it.
    with pytest.raises(wb.ConnectionFailedError):
        wb.ServiceClient(base_url=url, api_key=api_key, server_public_key=wrong,
                         connect_timeout=FAIL_FAST_S)


def test_plain_zeromq_gets_no_reply_but_curve_does(curve_server):
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    encrypted = ctx.socket(zmq.DEALER)
    try:
        for sock in (plain, encrypted):
            sock.setsockopt(zmq.LINGER, 0)
        public, secret = zmq.curve_keypair()
        encrypted.setsockopt(zmq.CURVE_PUBLICKEY, public)
        encrypted.setsockopt(zmq.CURVE_SECRETKEY, secret)
        encrypted.setsockopt(zmq.CURVE_SERVERKEY, curve_server.server_public_key.encode())
        for sock in (plain, encrypted):
            sock.connect(curve_server.url)
            sock.send_multipart(_hello_frames(curve_server.api_key))
        assert encrypted.poll(10_000), "the CURVE client got no hello reply"
        reply = wire.decode(encrypted.recv_multipart())
        assert reply["ok"] and reply["id"] == "raw-1"
        assert plain.poll(500) == 0, "a DEALER without CURVE got a reply from a CURVE server"
    finally:
        plain.close(0)
        encrypted.close(0)


def test_invalid_keys_raise_value_errors_naming_the_argument(monkeypatch):
    from workbench.events import EventStream

    url = "tcp://127.0.0.1:9"  # never reached: the key is checked first
    for bad in ("not-a-key", "~" * 40, "#" * 40):
        with pytest.raises(ValueError, match="server_public_key"):
            wb.ServiceClient(base_url=url, api_key="k", server_public_key=bad)
    with pytest.raises(ValueError, match="server_public_key"):
        EventStream(url, server_public_key="short")
    monkeypatch.setenv(SERVER_KEY_ENV, "bad key from the environment")
    with pytest.raises(ValueError, match=SERVER_KEY_ENV):
        wb.ServiceClient(base_url=url, api_key="k")


def test_cli_help_warning_and_bad_secret_files(tmp_path, capsys):
    from server.__main__ import build_parser, load_curve_secret, warn_if_exposed

    text = " ".join(build_parser().format_help().split())
    assert "--curve-secret-file" in text and "PATH.pub" in text and "WORKBENCH_SERVER_KEY" in text
    assert "plain HTTP, not covered by --curve-secret-file" in text

    warn_if_exposed("0.0.0.0", build_parser().parse_args(["--host", "0.0.0.0", "--api-key", "k"]))
    err = capsys.readouterr().err
    assert "WARNING" in err and "--curve-secret-file" in err and "clear text" in err
    warn_if_exposed("0.0.0.0", build_parser().parse_args(
        ["--host", "0.0.0.0", "--api-key", "k", "--curve-secret-file", "f"]))
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0", build_parser().parse_args(
        ["--host", "0.0.0.0", "--api-key", "k", "--curve-secret-file", "f", "--tinker-port", "0"]))
    assert "plain HTTP" in capsys.readouterr().err

    logged: list[str] = []
    bad = tmp_path / "bad.key"
    bad.write_text("this is not a key\n")
    with pytest.raises(SystemExit, match="bad.key.*not a z85 CURVE key.*secret key"):
        load_curve_secret(str(bad), logged.append)
    loose = tmp_path / "loose.key"
    loose.write_text(zmq.curve_keypair()[1].decode())
    os.chmod(loose, 0o644)
    secret = load_curve_secret(str(loose), logged.append)
    assert any("readable by other users" in line for line in logged), logged
    assert (tmp_path / "loose.key.pub").read_text().strip() == zmq.curve_public(secret).decode()


def test_ready_line_parsing():
    from workbench.local import parse_ready_line

    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # z85 may hold '=', ':' and the like
    assert parse_ready_line(f"workbench-server ready url=tcp://h:1 curve_public_key={key}\n") == (
        "tcp://h:1", {"curve_public_key": key})
    assert parse_ready_line("workbench-server ready url=tcp://h:1\n") == ("tcp://h:1", {})
    assert parse_ready_line("[workbench-server] loaded tiny-qwen3") is None


def test_wildcard_bound_server_advertises_events_the_client_can_reach(tmp_path):
    """Bound to 0.0.0.0 (the remote-use setup), the server advertises tcp://0.0.0.0:<port>
    for events; the client substitutes the host it dialled, and the stream delivers."""
    from workbench.connection import reachable_events_url

    assert reachable_events_url("tcp://0.0.0.0:5001", "tcp://10.1.2.3:7788") == "tcp://10.1.2.3:5001"
    assert reachable_events_url("tcp://[::]:5001", "tcp://[fe80::1]:7788") == "tcp://[fe80::1]:5001"
    assert reachable_events_url("tcp://127.0.0.1:5001", "tcp://10.1.2.3:7788") == "tcp://127.0.0.1:5001"
    running = start_server(tmp_path, "--host", "0.0.0.0", "--curve-secret-file", str(tmp_path / "k"))
    try:
        port = running.url.rpartition(":")[2]
        service = wb.ServiceClient(base_url=f"tcp://127.0.0.1:{port}", api_key=running.api_key,
                                   server_public_key=running.server_public_key)
        assert service.events_url.startswith("tcp://127.0.0.1:")
        events: list[dict] = []
        stream = service.events()
        stream.subscribe(events.append)
        try:
            time.sleep(0.5)  # PUB/SUB slow joiner
            sampler = service.create_sampling_client(base_model="tiny-qwen3")
            deadline = time.monotonic() + 20
            while not any(e.get("topic") == "cycle" for e in events) and time.monotonic() < deadline:
                # a cycle per request, until the (CURVE-slow) subscription hears one
                sampler.compute_logprobs(types.ModelInput.from_ints([5, 6, 7])).result(60)
                time.sleep(0.05)
            assert any(e.get("topic") == "cycle" for e in events), events
        finally:
            stream.close()
            service.close()
    finally:
        running.stop(timeout=30)


def test_magic_connects_with_the_server_key(curve_server):
    from kernel_ext.magics import TinkerMagics

    shell = ipython_shell()
    magics = TinkerMagics(shell)  # a session of its own: the module-wide connection stays as it is
    service = magics.tinker(f"connect {curve_server.url} --key {curve_server.api_key} "
                            f"--server-key {curve_server.server_public_key}")
    try:
        assert service.server_public_key == curve_server.server_public_key
        assert service.create_sampling_client(base_model="tiny-qwen3").compute_logprobs(
            types.ModelInput.from_ints([5, 6, 7])).result(60)[0] is None
    finally:
        service.close()
