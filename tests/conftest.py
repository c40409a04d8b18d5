"""Shared fixtures: a real workbench-server process on loopback with the tiny models.

Started through `workbench.local.LocalServer`, the same code that starts the embedded
server, so the tests exercise the real CLI, ready line and shutdown.
"""

from __future__ import annotations

import json
import os

# The suite runs several torch processes at once (pytest itself, servers, notebook kernels)
# on a 2-core machine. OpenMP's spinning worker threads then starve one another: a test that
# takes 0.6 s alone took 115 s beside a busy server. One thread per process, inherited by
# every server and kernel the tests start; the tiny models gain nothing from more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from workbench.local import LocalServer


def start_server(tmp_path, *extra: str, api_key: str = "test-key", timeout: float = 120) -> LocalServer:
    return LocalServer(device="cpu", startup_timeout=timeout, store=str(tmp_path / "store"),
                       api_key=api_key, extra_args=extra)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tenants_server(tmp_path, keys: dict[str, str], *extra: str) -> LocalServer:
    """A server for several tenants: `keys` (API key -> tenant) as its --api-keys file. The
    first key is also the server's own key, so its tenant is named "default"."""
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    running = start_server(tmp_path, "--models", "tiny-qwen3", "--api-keys", str(keys_file), *extra,
                           api_key=next(iter(keys)))
    running.store_root = tmp_path / "store"
    return running


def text_datum(tokenizer, text: str):
    """A cross-entropy Datum training on every next token of `text`."""
    import numpy as np

    from workbench import types

    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1)})


class RawClient:
    """A bare DEALER speaking the wire protocol, for what the SDK would refuse to send."""

    def __init__(self, url: str, key: str):
        import zmq

        self.key = key
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def call(self, op: str, args: dict, timeout: float = 30.0) -> dict:
        import uuid

        from workbench import wire

        request_id = uuid.uuid4().hex
        self.sock.send_multipart(wire.encode(wire.request(request_id, op, self.key, args)))
        while self.sock.poll(int(timeout * 1000)):
            reply = wire.decode(self.sock.recv_multipart())
            if reply.get("id") == request_id:
                return reply
        raise AssertionError(f"no reply to {op} within {timeout} s")

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("server"), "--models", "tiny-qwen3")
    yield running
    running.stop(timeout=30)


@pytest.fixture(scope="module")
def service(server):
    import workbench as wb

    return wb.ServiceClient(base_url=server.url, api_key=server.api_key)


def ipython_shell():
    """IPython's global test shell; `start_ipython` returns it only on its first call in a
    process (later calls return None), so every test module asks through here."""
    from IPython.testing import globalipapp

    return globalipapp.start_ipython() or globalipapp.get_ipython()
