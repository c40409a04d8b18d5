"""Shared fixtures: a real workbench-server process on loopback with the tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest

READY = "workbench-server ready url="


@dataclass
class RunningServer:
    url: str
    api_key: str
    process: subprocess.Popen
    store: str


def start_server(tmp_path, *extra: str, api_key: str = "test-key", timeout: float = 120) -> RunningServer:
    store = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "server", "--port", "0", "--device", "cpu", "--store", store, *extra]
    if api_key and "--api-keys" not in extra:
        cmd += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(READY):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    ready = [line for line in lines if line.startswith(READY)]
    if not ready:
        process.kill()
        raise RuntimeError(f"server did not start; stdout: {lines}")
    return RunningServer(ready[0][len(READY):].strip(), api_key, process, store)


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("server"), "--models", "tiny-qwen3")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def service(server):
    import workbench as wb

    return wb.ServiceClient(base_url=server.url, api_key=server.api_key)
