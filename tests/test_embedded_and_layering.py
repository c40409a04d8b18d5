"""The embedded local server's lifetime, and the dependency direction of DESIGN §1."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CLIENT_SCRIPT = """
import os, sys
import workbench as wb
from workbench import types
sc = wb.ServiceClient()
tc = sc.create_lora_training_client(base_model="tiny-qwen3", rank=4)
tok = tc.get_tokenizer()
ids = tok.encode("hello world")
out = tc.forward([types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                              loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})],
                 "cross_entropy").result(120)
print("PID", sc.local_server.pid, out.metrics["loss:sum"] > 0, flush=True)
if sys.argv[1] == "hang":
    import time; time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of someone else still answers kill(0); read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_embedded_server_survives_its_client(tmp_path, how):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    env["XDG_DATA_HOME"] = str(tmp_path)  # keep the embedded store out of the user's home
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, "hang" if how == "sigkill" else "exit"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    assert line.startswith("PID"), line
    _, pid, ok = line.split()
    assert ok == "True"
    pid = int(pid)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert _wait_gone(pid), f"embedded server {pid} outlived its client ({how})"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    return files


def test_engine_never_touches_sockets():
    for path in _files("server/engine"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("zmq", "msgpack") or m == "server.frontend"}
        assert not bad, f"{path} imports {bad}"


def test_client_never_imports_server():
    for package in ("workbench", "kernel_ext"):
        for path in _files(package):
            bad = {m for m in _imports(path) if m.split(".")[0] == "server"}
            assert not bad, f"{path} imports {bad}"


def test_client_imports_without_torch():
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import workbench, workbench.types, workbench.wire, kernel_ext\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr
