"""Shared fixtures: a real workbench-server process on loopback with the tiny models.

Started through `workbench.local.LocalServer`, the same code that starts the embedded
server, so the tests exercise the real CLI, ready line and shutdown.
"""

from __future__ import annotations

import pytest

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
