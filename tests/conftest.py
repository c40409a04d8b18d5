"""Shared fixtures: a real workbench-server process on loopback with the tiny models.

Started through `workbench.local.LocalServer`, the same code that starts the embedded
server, so the tests exercise the real CLI, ready line and shutdown.
"""

from __future__ import annotations

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
