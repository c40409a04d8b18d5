"""The Tinker HTTP gateway's bounds (issue 15, DESIGN §7): no tenant hurts another through it.

A real server process (its stderr kept in a file, to read its log) with small bounds:
--max-message-mb 1, --tinker-max-connections 16, --tinker-read-timeout 1.5. Requests are raw
HTTP over sockets (or http.client), so nothing in between buffers, retries or times out for us.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench import wire

from conftest import free_port

KEY_A, KEY_B = "tml-tenant-a-key-0123456789", "tml-tenant-b-key-0123456789"
LIMIT = 1 << 20  # --max-message-mb 1
MAX_CONNECTIONS = 16
READ_TIMEOUT = 1.5
BASE = "tiny-qwen3"



@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    (root / "keys.json").write_text(json.dumps({KEY_A: "tenant-a", KEY_B: "tenant-b"}))
    port, log_path = free_port(), root / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_URL", "WORKBENCH_API_KEY")}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
             "--store", str(root / "store"), "--api-keys", str(root / "keys.json"), "--tinker-port", str(port),
             "--max-message-mb", "1", "--tinker-max-connections", str(MAX_CONNECTIONS),
             "--tinker-read-timeout", str(READ_TIMEOUT), "--exit-with-parent", str(os.getpid())],
            stdout=subprocess.PIPE, stderr=log, env=env, text=True, start_new_session=True)
    found: list = []

    def read() -> None:
        for line in process.stdout:
            ready = wire.parse_ready_line(line)
            if ready is not None:
                found.append(ready)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    assert found, f"server not ready: {log_path.read_text()[-3000:]}"
    yield SimpleNamespace(pid=process.pid, port=port, url=found[0][0], store=root / "store", log=log_path)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ------------------------------------------------------------------ helpers

def _post(gw, path: str, body=None, key: str = KEY_A, method: str = "POST", headers=None):
    """(status, parsed JSON or text, seconds) of one request on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    started = time.monotonic()
    conn.request(method, path, body=data, headers={"X-API-Key": key, "Content-Type": "application/json",
                                                   **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = text
    return response.status, payload, time.monotonic() - started


def _connect(gw) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def _head(path: str, key: str = KEY_A, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"X-API-Key: {key}", "Content-Type: application/json",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_reply(sock: socket.socket, timeout: float):
    """(status, JSON body) of the reply on a raw socket; (None, None) if it closed without one."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    except ConnectionResetError:
        return None, None
    return int(head.split()[1]), json.loads(rest[:length])


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` within `timeout` (reading and dropping what it sends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
    return False


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _reset_peak(pid: int) -> int:
    """Reset the server's peak RSS (VmHWM) to its current RSS; returns that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _rss(pid)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_fds(pid: int, at_most: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while _fds(pid) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return _fds(pid)


def _result(gw, answer: dict, key: str = KEY_A, failing: bool = False) -> dict:
    for _ in range(60):
        status, result, _ = _post(gw, "/api/v1/retrieve_future", {"request_id": answer["request_id"]}, key=key)
        if status == 200:
            assert ("error" in result) == failing, result
            return result
        assert status == 408, (status, result)
    raise AssertionError("future never resolved")


# ------------------------------------------------------------------ tests

def test_an_oversized_body_is_refused_while_streaming_without_being_buffered(gw):
    # Declared too large: refused on its head, before a byte of it is read.
    with _connect(gw) as sock:
        sock.sendall(_head("/api/v1/create_model", content_length=str(1 << 30)))
        status, reply = _read_reply(sock, 10)
    assert status == 413 and "--max-message-mb" in reply["detail"] and "1 MiB" in reply["detail"], reply
    # Chunked, no length: counted as it streams, refused once past the limit while we keep sending.
    baseline = _reset_peak(gw.pid)
    sent, chunk = 0, b"x" * (1 << 20)
    with _connect(gw) as sock:
        sock.sendall(_head("/api/v1/create_model", transfer_encoding="chunked"))
        try:
            while sent < (256 << 20) and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass
        status, reply = _read_reply(sock, 10)
    assert status == 413 and "--max-message-mb" in reply["detail"], reply
    assert sent < (64 << 20), f"the server read {sent / 2**20:.0f} MiB before refusing"
    grown = _rss(gw.pid, "VmHWM") - baseline
    assert grown < LIMIT + (12 << 20), f"server peak RSS grew by {grown / 2**20:.1f} MiB"
    # A body within the limit still works.
    status, reply, _ = _post(gw, "/api/v1/create_session", {"pad": "y" * (LIMIT // 2)})
    assert status == 200 and reply["session_id"], reply


def test_a_zstd_bomb_is_refused_as_it_expands(gw):
    import zstandard

    # 256 MiB of zeros in a few KB, without a content size in its frame: only streaming finds out.
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()
    declared = zstandard.ZstdCompressor(level=1).compress(bytes(16 << 20))  # size in its header
    assert len(bomb) < 64 << 10
    baseline = _reset_peak(gw.pid)
    for body in (bomb, declared):
        status, reply, _ = _post(gw, "/api/v1/forward_backward", body,
                                 headers={"Content-Encoding": "zstd", "Content-Type": "application/x-protobuf"})
        assert status == 413 and "expands past" in reply["detail"] and "--max-message-mb" in reply["detail"], reply
    grown = _rss(gw.pid, "VmHWM") - baseline
    assert grown < LIMIT + (12 << 20), f"server peak RSS grew by {grown / 2**20:.1f} MiB"
    # A well-formed zstd body is decompressed for any endpoint.
    status, reply, _ = _post(gw, "/api/v1/create_session", zstandard.ZstdCompressor().compress(b"{}"),
                             headers={"Content-Encoding": "zstd"})
    assert status == 200 and reply["session_id"], reply
    status, reply, _ = _post(gw, "/api/v1/create_session", b"not zstd at all", headers={"Content-Encoding": "zstd"})
    assert status == 400 and "zstd" in reply["detail"], reply


def test_unfinished_bodies_and_silent_connections_are_closed_and_free_their_descriptors(gw):
    before = _fds(gw.pid)
    unfinished = [_connect(gw) for _ in range(4)]
    for sock in unfinished:  # an authenticated request whose body never completes
        sock.sendall(_head("/api/v1/create_model", content_length="1000") + b'{"session_id"')
    silent = [_connect(gw) for _ in range(3)]  # never say anything
    half_head = _connect(gw)
    half_head.sendall(b"POST /api/v1/create_model HTTP/1.1\r\nHost: x\r\n")
    trickle = _connect(gw)  # a head sent a byte at a time: each byte does not buy more time
    stop = threading.Event()

    def drip() -> None:
        try:
            trickle.sendall(b"GET /api/v1/healthz HTTP/1.1\r\nX-Pad: ")
            while not stop.wait(0.2):
                trickle.sendall(b"a")
        except OSError:
            pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    time.sleep(0.3)
    started = time.monotonic()
    for sock in unfinished:
        status, reply = _read_reply(sock, READ_TIMEOUT + 5)
        assert status == 408 and "--tinker-read-timeout" in reply["detail"], reply
        assert _closed_within(sock, 2)
    status, reply = _read_reply(half_head, READ_TIMEOUT + 5)
    assert status == 408 and "head" in reply["detail"], reply
    for sock in [*silent, trickle]:
        assert _closed_within(sock, READ_TIMEOUT + 5)
    assert time.monotonic() - started < READ_TIMEOUT + 4
    stop.set()
    dripper.join()
    for sock in [*unfinished, *silent, half_head, trickle]:
        sock.close()
    assert _wait_fds(gw.pid, before + 1, 5) <= before + 1


def test_connections_over_the_limit_get_503_and_a_tenant_goes_on_afterwards(gw):
    before = _fds(gw.pid)
    held = [_connect(gw) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)
    try:
        status, reply, _ = _post(gw, "/api/v1/get_server_capabilities", method="GET")
        assert status == 503 and "--tinker-max-connections" in reply["detail"], reply
        # Beyond twice the limit, connections are closed at once: descriptors stay bounded.
        flood = [_connect(gw) for _ in range(2 * MAX_CONNECTIONS + 10)]
        time.sleep(0.3)
        assert _fds(gw.pid) <= before + 2 * MAX_CONNECTIONS + 2
        assert _closed_within(flood[-1], 1.0)
        for sock in flood:
            sock.close()
    finally:
        for sock in held:
            sock.close()
    _wait_fds(gw.pid, before + 1, 5)
    status, reply, _ = _post(gw, "/api/v1/get_server_capabilities", method="GET")
    assert status == 200 and "supported_models" in reply, reply


def test_tenant_b_cannot_take_over_tenant_a_sessions_models_or_paths(gw):
    status, reply, _ = _post(gw, "/api/v1/create_session", {})
    session = reply["session_id"]
    answer = _post(gw, "/api/v1/create_model", {"session_id": session, "model_seq_id": 0, "base_model": BASE,
                                                 "lora_config": {"rank": 4}})[1]
    model_id = answer["model_id"]
    assert model_id == f"{session}:train:0"
    _result(gw, answer)
    run_id = _post(gw, f"/api/v1/training_runs/{model_id}", method="GET")[1]["training_run_id"]
    saved = _result(gw, _post(gw, "/api/v1/save_weights", {"model_id": model_id, "path": "mine", "seq_id": 1})[1])
    path = saved["path"]
    assert path == f"tinker://{run_id}/weights/mine"

    store = str(gw.store)
    missing = f"session-{uuid.uuid4().hex[:16]}"
    replies = []
    for sid in (session, missing):  # A's session answers B exactly as a missing one does
        status, reply, _ = _post(gw, "/api/v1/create_model", {"session_id": sid, "model_seq_id": 0,
                                                               "base_model": BASE}, key=KEY_B)
        assert status == 404, reply
        replies.append(reply["detail"].replace(sid, "<id>"))
        for request in ({"session_id": sid, "model_seq_id": 0, "path": path},):
            status, reply, _ = _post(gw, "/api/v1/load_weights", request, key=KEY_B)
            assert status == 404, reply
        status, reply, _ = _post(gw, f"/api/v1/sessions/{sid}/finish", {}, key=KEY_B)
        assert status == 404, reply
    assert replies[0] == replies[1]
    status, reply, _ = _post(gw, "/api/v1/session_heartbeat", {"session_id": session}, key=KEY_B)
    assert status == 404, reply
    # A's model id and paths mean nothing to B, and no answer names A's run or the store.
    probes = [("POST", "/api/v1/get_info", {"model_id": model_id}),
              ("POST", "/api/v1/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": 1e-3}}),
              ("GET", f"/api/v1/training_runs/{model_id}", None),
              ("GET", f"/api/v1/training_runs/{model_id}/checkpoints", None),
              ("GET", f"/api/v1/training_runs/{run_id}/checkpoints/weights/mine/external_weights_urls", None),
              ("DELETE", f"/api/v1/training_runs/{run_id}/checkpoints/weights/mine", None),
              ("POST", "/api/v1/create_sampling_session", {"model_path": path}),
              ("POST", "/api/v1/load_weights", {"model_id": model_id, "path": path}),
              ("GET", f"/api/v1/checkpoint_files/{run_id}/weights/mine/adapter_config.json", None)]
    for method, url, body in probes:
        status, reply, _ = _post(gw, url, body, key=KEY_B, method=method)
        assert status in (401, 404), (url, status, reply)
        text = json.dumps(reply)
        assert store not in text and str(Path(store).resolve()) not in text, (url, text)
        if model_id in url or (body and body.get("model_id")):
            assert run_id not in text, (url, text)
    # A's model is untouched and still A's.
    status, reply, _ = _post(gw, "/api/v1/get_info", {"model_id": model_id})
    assert status == 200 and reply["lora_rank"] == 4, reply
    status, reply, _ = _post(gw, "/api/v1/session_heartbeat", {"session_id": session})
    assert status == 200, reply
    # A failure inside the store (a file where its directory should be) names no server path.
    (gw.store / "runs" / run_id / "sampler_weights").write_text("in the way")
    failed = _result(gw, _post(gw, "/api/v1/save_weights_for_sampler",
                               {"model_id": model_id, "path": "snap", "seq_id": 2})[1], failing=True)
    assert store not in failed["error"] and failed["category"] == "server", failed


def test_error_messages_lose_server_paths_but_keep_checkpoint_paths():
    from server.tinker_http import public

    assert public("OSError: [Errno 24] Too many open files: '/home/u/Application Support/store/runs/x'") \
        == "OSError: [Errno 24] Too many open files: '<server path>'"
    assert public("cannot read /srv/store/runs/run-1/run.json (gone)") == "cannot read <server path> (gone)"
    for kept in ("checkpoint 'tinker://run-1/weights/a' not found", "wb://run-1/sampler_weights/b",
                 "see http://127.0.0.1:8000/api/v1/healthz", "rank 4/8 and a / b"):
        assert public(kept) == kept


def test_wrong_keys_get_slower_valid_keys_never(gw):
    """After 5 failures from one source within a minute, each failed key waits 50 ms, doubling."""
    import zmq

    times = [_post(gw, "/api/v1/client/config", {}, key=f"tml-wrong-{i}")[::2] for i in range(10)]
    assert all(status == 401 for status, _ in times), times
    first, last = sorted(seconds for _, seconds in times[:4])[1], times[-1][1]
    assert last >= 0.7 and last > first + 0.5, times
    status, _, seconds = _post(gw, "/api/v1/client/config", {})
    assert status == 200 and seconds < 0.5, seconds  # a valid key from the same address: not delayed

    # The ZeroMQ frontend backs off too (counted for all its peers together).
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(gw.url)
    try:
        def ping(key: str) -> tuple[dict, float]:
            started = time.monotonic()
            sock.send_multipart(wire.encode(wire.request(uuid.uuid4().hex, "ping", key, {})))
            assert sock.poll(10_000), "no reply"
            return wire.decode(sock.recv_multipart()), time.monotonic() - started

        assert ping(KEY_A)[0]["ok"]  # connected
        answers = [ping(f"wrong-{i}") for i in range(10)]
        assert all(not reply["ok"] and "API key" in reply["error"]["message"] for reply, _ in answers), answers
        first, last = sorted(seconds for _, seconds in answers[:4])[1], answers[-1][1]
        assert last >= 0.7 and last > first + 0.5, [seconds for _, seconds in answers]
        reply, seconds = ping(KEY_A)
        assert reply["ok"] and seconds < 0.5, (reply, seconds)
    finally:
        sock.close(0)


def test_client_errors_are_logged_as_one_line(gw):
    log = gw.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    lines = [line for line in log.splitlines() if "tinker gateway: " in line]
    assert any(" 404 POST /api/v1/create_model (tenant 'tenant-b'" in line for line in lines), lines
    assert any(" 413 POST /api/v1/create_model" in line and "--max-message-mb" in line for line in lines), lines
    assert any(" 401 POST /api/v1/client/config (127.0.0.1)" in line for line in lines), lines
    assert sum(" 401 POST /api/v1/client/config" in line for line in lines) < 9  # repeats not all logged


def test_one_tenant_cannot_hold_more_than_its_body_budget():
    """4 x --max-message-mb of bodies per tenant at once (being read or handled); over it a
    request waits for room until its read deadline, then gets 429; other tenants are unaffected.
    (The budget's bookkeeping alone, in-process: holding it open over HTTP needs requests that
    outlast the read timeout.)"""
    import asyncio

    from server.tinker_http import TinkerGateway, _Refused

    gateway = TinkerGateway(None, {}, max_body_bytes=1000, read_timeout_s=1.0)

    async def scenario() -> None:
        now = time.monotonic()
        for _ in range(4):
            await gateway._reserve("a", 1000, now + 1)
        with pytest.raises(_Refused) as refused:
            await gateway._reserve("a", 1, time.monotonic() + 0.2)
        assert refused.value.status == 429 and "--max-message-mb" in refused.value.message
        await gateway._reserve("b", 1000, time.monotonic() + 0.2)  # another tenant: room at once
        waiting = asyncio.ensure_future(gateway._reserve("a", 1000, time.monotonic() + 5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await gateway._release("a", 1000)  # a reply went out: the waiting request goes on
        await asyncio.wait_for(waiting, 1)
        assert gateway._body_bytes == {"a": 4000, "b": 1000}

    asyncio.run(scenario())


def test_unload_model_frees_a_tenants_model_and_keeps_its_checkpoints(gw):
    session = _post(gw, "/api/v1/create_session", {})[1]["session_id"]
    answer = _post(gw, "/api/v1/create_model", {"session_id": session, "model_seq_id": 0, "base_model": BASE,
                                                 "lora_config": {"rank": 4}})[1]
    model_id = answer["model_id"]
    _result(gw, answer)
    saved = _result(gw, _post(gw, "/api/v1/save_weights", {"model_id": model_id, "path": "kept", "seq_id": 1})[1])
    status, reply, _ = _post(gw, "/api/v1/unload_model", {"model_id": model_id}, key=KEY_B)
    assert status == 404, reply  # another tenant's model id means nothing
    unloaded = _result(gw, _post(gw, "/api/v1/unload_model", {"model_id": model_id, "seq_id": 2})[1])
    assert unloaded == {"type": "unload_model", "model_id": model_id}
    gone = _result(gw, _post(gw, "/api/v1/save_weights", {"model_id": model_id, "path": "late", "seq_id": 3})[1],
                   failing=True)
    assert "not found" in gone["error"]
    run_id = saved["path"].split("/")[2]
    checkpoints = _post(gw, f"/api/v1/training_runs/{run_id}/checkpoints", method="GET")[1]["checkpoints"]
    assert [c["checkpoint_id"] for c in checkpoints] == ["weights/kept"]
