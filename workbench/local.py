"""The embedded local server: what `ServiceClient()` starts when no URL is given.

A `workbench-server` subprocess on loopback with a random free port and a random key,
device auto. It lives in its own process group and is stopped when this process exits:
by atexit on a normal exit or Ctrl-C, and by the server itself (it watches our pid) if we
die without running atexit (a crash, SIGKILL).

Its log (start-up line, model conversion progress, warnings) goes to this process's stderr in
a terminal. Inside a Jupyter kernel it goes to a file instead (`log_path`, named in the error
if the server fails to start): a kernel shows every line a subprocess writes to stderr as a red
box in whichever cell happens to run, which reads as an error when it is not one.

The server's ready line is ``workbench-server ready url=<url>`` followed by optional
``name=value`` fields (``curve_public_key=<z85>`` when it runs with --curve-secret-file);
`workbench.wire.parse_ready_line` reads it for any launcher of the server.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence, Union

# The ready line's grammar is a protocol fact (workbench.wire); re-exported for old imports.
from .wire import READY_PREFIX, parse_ready_line  # noqa: F401


def in_jupyter_kernel() -> bool:
    """True inside an IPython kernel (a notebook), False in a terminal IPython or a script."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class LocalServer:
    def __init__(self, models: str = "", device: str = "auto", startup_timeout: float = 180.0,
                 store: Optional[str] = None, api_key: Optional[str] = None,
                 extra_args: Sequence[str] = (), log: Union[str, None] = "auto"):
        """`log`: "auto" (a file inside a Jupyter kernel, else inherit stderr), "stderr", or
        a file path the server's log is appended to."""
        if log not in ("auto", "stderr") and not isinstance(log, (str, os.PathLike)):
            raise ValueError(f"log must be 'auto', 'stderr' or a file path, got {log!r}")
        if log == "auto":
            log = os.path.join(tempfile.gettempdir(), f"workbench-server-{os.getpid()}-{secrets.token_hex(3)}.log") \
                if in_jupyter_kernel() else "stderr"
        self.log_path: Optional[str] = None if log == "stderr" else os.fspath(log)
        self.api_key = api_key or "local-" + secrets.token_hex(16)
        self.store = store
        cmd = [
            sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
            "--device", device, "--exit-with-parent", str(os.getpid()), *extra_args,
        ]
        if models:
            cmd += ["--models", models]
        if store:
            cmd += ["--store", store]
        # The key goes by environment, not argv, so other users cannot read it from `ps`.
        env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_URL"}
        env["WORKBENCH_API_KEY"] = self.api_key
        log_file = None if self.log_path is None else open(self.log_path, "a")
        try:
            self.process = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True,
                start_new_session=True,  # its own process group: Ctrl-C in a notebook spares it
            )
        finally:
            if log_file is not None:
                log_file.close()  # the child holds its own descriptor
        atexit.register(self.stop)
        self.url, fields = self._wait_ready(startup_timeout)
        # z85 public key when extra_args turned CURVE on (--curve-secret-file), else None.
        self.server_public_key: Optional[str] = fields.get("curve_public_key")

    def _wait_ready(self, timeout: float) -> tuple[str, dict[str, str]]:
        found: list[tuple[str, dict[str, str]]] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                ready = parse_ready_line(line)
                if ready is not None:
                    found.append(ready)
                    break

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # Watch the process too: one that exits without the ready line fails at once, even if
        # its stdout is slow to reach end-of-file.
        deadline = time.monotonic() + timeout
        while reader.is_alive() and time.monotonic() < deadline:
            reader.join(0.1)
            if self.process.poll() is not None:
                reader.join(1.0)  # a ready line written just before exiting is still read
                break
        if not found:
            code = self.process.poll()
            self.stop()
            why = f"exited with code {code}" if code is not None else f"was not ready within {timeout:.0f} s"
            if self.log_path is None:
                raise RuntimeError(f"the embedded workbench server {why}; its log is above on stderr")
            raise RuntimeError(f"the embedded workbench server {why}; the end of its log "
                               f"({self.log_path}):\n{self.log_tail()}")
        return found[0]

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log file ("" when it logs to stderr)."""
        if self.log_path is None or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            # tqdm redraws with \r: keep each line's last state
            return "\n".join(line.rsplit("\r", 1)[-1] for line in f.read().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        return self.process.pid


_shared: Optional[LocalServer] = None
_shared_lock = threading.Lock()


def shared_local_server() -> LocalServer:
    """One embedded server per client process, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.process.poll() is not None:
            _shared = LocalServer(models=os.environ.get("WORKBENCH_LOCAL_MODELS", ""))
        return _shared
