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


def _runs_without(package: str, code: str) -> None:
    """`code` runs in a fresh interpreter in which `package` cannot be imported."""
    script = ("import sys, importlib.abc\n"
              "class Block(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path, target=None):\n"
              f"        if name.split('.')[0] == {package!r}: raise ImportError('{package} blocked')\n"
              "sys.meta_path.insert(0, Block())\n"
              f"{code}\n"
              "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


def test_client_imports_without_torch():
    _runs_without("torch", "import workbench, workbench.types, workbench.wire, kernel_ext")


def _workbench_imports(path: Path) -> set[str]:
    """Every workbench module a file imports, lazily imported ones included
    (`from workbench import wire` counts as workbench.wire)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "workbench")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "workbench":
            if node.module == "workbench":
                found.update(f"workbench.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return found


# The protocol both sides share: the server may import these and nothing else of the SDK.
SHARED_PROTOCOL = {"workbench.types", "workbench.wire", "workbench.errors", "workbench.paths", "workbench.losses"}


def test_server_imports_only_the_shared_protocol_modules_of_the_sdk():
    for path in _files("server"):
        bad = _workbench_imports(path) - SHARED_PROTOCOL
        assert not bad, f"{path} imports {bad}: the server may share only {sorted(SHARED_PROTOCOL)}"


def test_the_shared_protocol_modules_import_nothing_else_of_the_sdk():
    for name in SHARED_PROTOCOL:
        path = ROOT / (name.replace(".", "/") + ".py")
        relative = {f"workbench.{node.module}" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        relative |= {f"workbench.{a.name}" for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module
                     for a in node.names}
        bad = (relative | _workbench_imports(path)) - SHARED_PROTOCOL
        assert not bad, f"{path} imports {bad}"


def test_kernel_ext_uses_only_the_public_sdk():
    """The notebook layer is a shell over the SDK a script uses: no transport modules, no
    private names, no private attributes of SDK objects."""
    transport = {"workbench.connection", "workbench.local", "workbench.tokenizer_cache"}
    for path in _files("kernel_ext"):
        tree = ast.parse(path.read_text())
        bad = _workbench_imports(path) & transport
        assert not bad, f"{path} imports {bad}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path}:{node.lineno} imports private {private}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("_"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                # its own objects and modules only (`magics` is kernel_ext.magics)
                assert owner in ("self", "cls", "magics"), f"{path}:{node.lineno} reads {ast.unparse(node)}"


def test_the_engine_imports_without_zeromq():
    """The GPU machine has no pyzmq: the engine imports only the SDK's protocol modules,
    and the package loads its clients (which bring ZeroMQ) on first use."""
    _runs_without("zmq", "import server.engine.engine, server.engine.sampler, server.ops, workbench.types\n"
                         "assert 'workbench.connection' not in sys.modules")
