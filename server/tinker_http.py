"""Tinker's HTTP protocol as a second frontend on the same scheduler.

The official `tinker` SDK (0.38), pointed at ``TINKER_BASE_URL=http://127.0.0.1:<port>``
with a ``tml-...`` key, trains, samples and checkpoints through our clock cycles. Like the
ZeroMQ frontend this only translates: it checks keys, turns requests into `Work` for the
shared `Scheduler`, and turns results into Tinker's replies (JSON, or protobuf for
ForwardBackwardOutput / SampleResponse, see `tinker_proto`). The scheduler decides.

Threads: uvicorn serves a Starlette app on its own asyncio loop in a daemon thread. Every
piece of state here (futures, sequencers, id maps) is touched on that loop only; results
produced on the engine thread come back through `call_soon_threadsafe`.

Protocol facts kept here (reference/tinker-wire.md):
- Heavy endpoints answer ``{"request_id", "model_id"?, "sample_sequence_ids"?}`` at once;
  the client long-polls ``retrieve_future``, held up to `hold_s`, then HTTP 408 try_again
  whose ``queue_state_reason`` names our current cycle and queue depth. A failure is
  HTTP 200 ``{"error", "category"}``.
- Each training client numbers its requests (seq_id 1, 2, ...). They are submitted to the
  scheduler per model in that order; a gap (chunked batches arrive in parallel, first chunk
  last) is waited for, up to `gap_timeout_s`, after which the lowest waiting seq_id goes on
  (a client that lost a request must not freeze its model forever). A resent seq_id (or
  create/sample id) gets the original request id: never a second execution.
- Sessions live in the same book as the ZeroMQ frontend's (`server.sessions.Sessions`):
  create_session opens one, session_heartbeat is a sign of life (HTTP 410 once finished,
  which stops the SDK's heartbeat loop), sessions/{id}/finish parks its runs at once.
  create_model / load_weights attach the new run to the body's session_id; a sampler on a
  checkpoint joins the session it was created in. Every request that names a model or a
  sampler is a sign of life of its session and unparks it before it is queued.
- Model ids are the SDK's ``<session_id>:train:<n>`` (it derives them itself when loading
  a state); they map onto our store's run ids, and ``tinker://<run_id>/<kind>/<name>`` maps
  one to one onto ``wb://<run_id>/<kind>/<name>``.

Bounds (DESIGN §7: no tenant can hurt another through this port either):
- A body is read only after the request's API key checks out, streamed, never past
  `max_body_bytes` (the ZeroMQ frontend's --max-message-mb): over it, HTTP 413. A zstd body
  (Content-Encoding: zstd) is decompressed as a stream and refused (413) once its output
  passes the same limit, so a small bomb never expands in memory.
- `read_timeout_s` (--tinker-read-timeout): a request's head must arrive within it of the
  connection opening (or of the previous reply), its body within it of the head; a late body
  gets HTTP 408 and its connection is closed, a silent or trickling connection is closed.
- `max_connections` (--tinker-max-connections): a request on a connection beyond it gets
  HTTP 503 (the SDK retries those); beyond twice it, connections are closed at once. The
  process' open-file limit is raised to fit (or the limit lowered, with a warning), so the
  store always has file descriptors left.
- Sessions belong to the tenant that created them: another tenant naming one gets the 404 a
  missing session gets, so no model id (``<session_id>:train:<n>``) can be taken over. Errors
  never carry server paths; another tenant's ids are never resolved.
- Unknown API keys: after `KEY_FREE_FAILURES` failures from one client address within a
  minute, each further failure is answered later (50 ms, doubling, at most 4 s), on the event
  loop (nobody else waits); valid keys are never delayed. Client errors are logged as one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from workbench.errors import (
    AuthenticationError, InvalidRequestError, NotFoundError, QueueFullError, WorkbenchError,
)
from workbench.paths import SCHEME as WB, TINKER_SCHEME as TINKER, to_tinker, to_wb

from . import ops, tinker_proto
from .scheduler import Scheduler, Work, as_error
from .sessions import Sessions

_PROTO = "application/x-protobuf"

# Paths served without an API key (a download link carries its own signature instead).
_PUBLIC = ("/api/v1/healthz", "/api/v1/telemetry", "/api/v1/checkpoint_files/")

# An absolute filesystem path in an error message (an OSError's file name, quoted, spaces and
# all; or bare); URLs and tinker:// or wb:// paths are not matched (their slashes follow ':',
# '/' or a word character).
_SERVER_PATH = re.compile(r"""(?<![\w:/.~-])(['"])/(?:(?!\1).)*\1|(?<![\w:/.~-])/[^\s'",:/)\]]+(?:/[^\s'",:/)\]]*)*""")

# Back-off for unknown API keys (per client address over HTTP, global over ZeroMQ).
KEY_FREE_FAILURES = 5  # failures within KEY_WINDOW_S answered at once
KEY_WINDOW_S = 60.0  # a source silent this long starts again from zero
KEY_DELAY_S, KEY_MAX_DELAY_S = 0.05, 4.0  # the first delay, doubling up to the cap
KEY_MAX_WAITING = 32  # delayed answers waiting per source; beyond, answered at once with 429


def public(message: str) -> str:
    """An error message fit for a client: no server paths (store, model or temp files)."""
    return _SERVER_PATH.sub(lambda m: f"{m[1]}<server path>{m[1]}" if m[1] else "<server path>", message)


class KeyBackoff:
    """Failed API keys per source: `failed(source)` counts one and returns how long its
    answer should wait (0 for the first `KEY_FREE_FAILURES` within `KEY_WINDOW_S`)."""

    def __init__(self, max_sources: int = 4096):
        self._failures: "OrderedDict[str, tuple[int, float]]" = OrderedDict()
        self._max_sources = max_sources
        self._lock = threading.Lock()

    def failed(self, source: str) -> tuple[int, float]:
        """(failures from `source` in its current window, the delay for this answer)."""
        now = time.monotonic()
        with self._lock:
            count, last = self._failures.pop(source, (0, now))
            count = 1 if now - last > KEY_WINDOW_S else count + 1
            self._failures[source] = (count, now)
            while len(self._failures) > self._max_sources:
                self._failures.popitem(last=False)
        excess = count - KEY_FREE_FAILURES
        return count, 0.0 if excess <= 0 else min(KEY_MAX_DELAY_S, KEY_DELAY_S * 2 ** min(excess - 1, 16))


class _Refused(Exception):
    """A request turned away by the gateway's bounds before any handler saw it."""

    def __init__(self, status: int, message: str, kind: str, close: bool = False, quiet: bool = False,
                 note: str = ""):
        super().__init__(message)
        self.status, self.message, self.kind, self.close = status, message, kind, close
        self.quiet, self.note = quiet, note  # not logged; said in the log only


class _Gone(Exception):
    """The client disconnected before its body was complete."""


def _source(scope: dict) -> str:
    """The client's address (what the key back-off is counted by)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _fd_room(wanted: int, log: Callable[[str], None]) -> int:
    """How many connections the gateway may hold: up to twice `max_connections` sockets are
    open at once (those over it wait for their 503), plus 256 descriptors kept for the store,
    the models and ZeroMQ. Raises the soft open-file limit toward the hard one when that is
    needed; if even the hard limit is too low, lowers the connection limit, with a warning."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to check
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    allowed = max(1, (soft - 256) // 2)
    log(f"warning: the open-file limit ({soft}) leaves room for {allowed} tinker gateway connections, not "
        f"{wanted}: --tinker-max-connections lowered to {allowed} (raise `ulimit -n` for more)")
    return allowed


def _raw_reply(status: int, reason: str, kind: str, message: str) -> bytes:
    """A whole HTTP response that closes its connection, for the transport itself."""
    body = json.dumps({"detail": message, "error": message, "type": kind}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _connection_class(gateway: "TinkerGateway") -> type:
    """uvicorn's h11 protocol with the gateway's connection bounds: a connection over
    `max_connections` has its requests answered 503, one over twice that is closed at once;
    a request head must arrive within `read_timeout_s` of the connection opening or of the
    previous reply (data trickling in does not extend it), else the connection is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Connection(H11Protocol):
        _head_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_now = len(self.connections)
            if open_now > 2 * gateway.max_connections:
                gateway._refusals += 1
                if gateway._refusals & (gateway._refusals - 1) == 0:  # 1, 2, 4, ...: a flood is not a log flood
                    gateway.log(f"tinker gateway: {open_now} connections open, over twice "
                                f"--tinker-max-connections {gateway.max_connections}: closing new ones at once "
                                f"({gateway._refusals} so far)")
                transport.close()
                return
            if open_now > gateway.max_connections:
                self.app = gateway._busy
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(gateway.read_timeout_s, self._head_overdue, self.cycle)

        def _head_overdue(self, cycle: Any) -> None:
            self._head_timer = None
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if not waiting or self.transport.is_closing():
                return  # a request came (its reply re-arms the timer), or the connection is gone
            if self.conn.trailing_data[0]:  # a head was begun: say why it ends
                self.transport.write(_raw_reply(
                    408, "Request Timeout", "RequestTimeout",
                    f"request head not received within {gateway.read_timeout_s:g} s "
                    "(workbench-server --tinker-read-timeout)"))
            self.transport.close()

    return Connection


def _checkpoint(record: Optional[dict]) -> Optional[dict]:
    """A store checkpoint record as Tinker's Checkpoint."""
    if record is None:
        return None
    out = {k: v for k, v in record.items() if k != "path"}
    out["tinker_path"] = to_tinker(record["path"])
    return out


def _run_record(run: dict) -> dict:
    return {**run, "last_checkpoint": _checkpoint(run.get("last_checkpoint")),
            "last_sampler_checkpoint": _checkpoint(run.get("last_sampler_checkpoint"))}


def _metrics(metrics: dict) -> dict:
    # The SDK splits every key on ":" to combine chunked results: a bare name would crash it.
    return {(k if ":" in k else f"{k}:mean"): float(v) for k, v in (metrics or {}).items()}


class _Failed(Exception):
    """A future's failure as Tinker reports it: HTTP 200 {error, category}."""

    def __init__(self, error: BaseException):
        wb_error = as_error(error)
        super().__init__(public(str(wb_error)))
        self.category = "server" if getattr(wb_error, "category", "server") == "server" else "user"


@dataclass
class _Future:
    tenant: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    body: Optional[bytes] = None  # protobuf reply
    result: Any = None  # JSON reply
    error: Optional[_Failed] = None


class _Sequencer:
    """Per-model turn keeping: seq_id n is submitted only after n-1 (or after a gap timeout)."""

    def __init__(self, gap_timeout_s: float):
        self.next = 1
        self.gap_timeout_s = gap_timeout_s
        self._waiting: dict[int, asyncio.Event] = {}

    async def turn(self, seq_id: int) -> None:
        if seq_id <= self.next:  # its turn, or one from before a restart: no order to keep
            return
        event = self._waiting.setdefault(seq_id, asyncio.Event())
        while self.next < seq_id:
            try:
                await asyncio.wait_for(event.wait(), self.gap_timeout_s)
            except asyncio.TimeoutError:
                if self.next < seq_id and seq_id == min(self._waiting):
                    self.next = seq_id  # the gap never filled: go on rather than stall the model
        self._waiting.pop(seq_id, None)

    def done(self, seq_id: int) -> None:
        self.next = max(self.next, seq_id + 1)
        event = self._waiting.get(self.next)
        if event is not None:
            event.set()


@dataclass
class _Model:
    tenant: str
    run_id: str
    base_model: str
    rank: int
    arch: str


class TinkerGateway:
    """The HTTP frontend. `start(host, port)` serves in a daemon thread; `stop()` ends it."""

    def __init__(self, scheduler: Scheduler, keys: dict[str, str],
                 capabilities: Callable[[], dict] = lambda: {"supported_models": []},
                 tokenizer_id: Callable[[str], str] = lambda name: name,
                 hold_s: float = 25.0, gap_timeout_s: float = 30.0, max_futures: int = 4096,
                 max_rank: int = 128, sessions: Optional[Sessions] = None,
                 limits: Optional[ops.Limits] = None, max_body_bytes: int = 256 * 2**20,
                 max_connections: int = 1024, read_timeout_s: float = 30.0,
                 log: Optional[Callable[[str], None]] = None):
        self.scheduler = scheduler
        # The ZeroMQ frontend's book (shared parking); a private one keeps books only.
        self.sessions = sessions if sessions is not None else Sessions(120.0)
        self.keys = keys  # api key -> tenant (the ZeroMQ frontend's mapping)
        self.limits = limits if limits is not None else ops.Limits(max_rank=max_rank)  # the ZeroMQ frontend's bounds, the same table
        self.capabilities = capabilities
        self.tokenizer_id = tokenizer_id
        self.hold_s, self.gap_timeout_s, self.max_futures = hold_s, gap_timeout_s, max_futures
        self._futures: "OrderedDict[str, _Future]" = OrderedDict()
        self._idempotent: "OrderedDict[tuple, dict]" = OrderedDict()  # resend key -> first reply
        self._sequencers: dict[str, _Sequencer] = {}
        self._models: dict[str, _Model] = {}  # tinker model id -> run
        self._samplers: dict[str, dict] = {}  # sampler id -> {tenant, base_model, model_path}
        self._sign_key = secrets.token_bytes(32)  # signs download URLs (they carry no API key)
        # Bounds of this port (see the module docstring).
        self.max_body_bytes, self.max_connections = max_body_bytes, max_connections
        self.read_timeout_s = read_timeout_s
        self.max_body_bytes_per_tenant = 4 * max_body_bytes  # bodies being read or handled at once
        self._body_bytes: dict[str, int] = {}  # tenant -> bytes reserved
        self._body_room = asyncio.Condition()
        self.log = log or (lambda line: print(f"[workbench-server] {line}", file=sys.stderr, flush=True))
        self._key_backoff = KeyBackoff()
        self._key_waiting: dict[str, int] = {}  # source -> delayed answers pending
        self._refusals = 0  # connections closed at once (over twice max_connections)
        # Session id -> the tenant that created it; per tenant in use order, bounded.
        self._session_owner: dict[str, str] = {}
        self._sessions_of: dict[str, "OrderedDict[str, None]"] = {}
        self.max_sessions_per_tenant = 16384
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    # ------------------------------------------------------------ lifetime

    def start(self, host: str, port: int) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        self.max_connections = _fd_room(self.max_connections, self.log)
        # h11 with the connection bounds; idle keep-alive connections close after 5 s.
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1, access_log=False,
                                http=_connection_class(self), timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(started.set)
            self._loop.run_until_complete(self._server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=serve, name="tinker-http", daemon=True)
        self._thread.start()
        started.wait(30)
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def app(self) -> Starlette:
        post, get = ["POST"], ["GET"]
        routes = [
            Route("/api/v1/healthz", lambda r: JSONResponse({"status": "ok"}), methods=get),
            Route("/api/v1/client/config", self._client_config, methods=post),
            Route("/api/v1/create_session", self._create_session, methods=post),
            Route("/api/v1/session_heartbeat", self._heartbeat, methods=post),
            Route("/api/v1/sessions/{session_id}/finish", self._finish_session, methods=post),
            Route("/api/v1/telemetry", self._telemetry, methods=post),
            Route("/api/v1/get_server_capabilities", self._capabilities, methods=["GET", "POST"]),
            Route("/api/v1/create_model", self._create_model, methods=post),
            Route("/api/v1/get_info", self._get_info, methods=post),
            Route("/api/v1/forward_backward", self._forward_backward, methods=post),
            Route("/api/v1/optim_step", self._optim_step, methods=post),
            Route("/api/v1/save_weights", self._save_weights, methods=post),
            Route("/api/v1/unload_model", self._unload_model, methods=post),
            Route("/api/v1/load_weights", self._load_weights, methods=post),
            Route("/api/v1/save_weights_for_sampler", self._save_for_sampler, methods=post),
            Route("/api/v1/create_sampling_session", self._create_sampling_session, methods=post),
            Route("/api/v1/asample", self._asample, methods=post),
            Route("/api/v1/retrieve_future", self._retrieve_future, methods=post),
            Route("/api/v1/samplers/{sampler_id}", self._get_sampler, methods=get),
            Route("/api/v1/training_runs", self._list_runs, methods=get),
            Route("/api/v1/training_runs/{run_id}", self._get_run, methods=get),
            Route("/api/v1/training_runs/{run_id}/checkpoints", self._list_checkpoints, methods=get),
            Route("/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}", self._delete_checkpoint,
                  methods=["DELETE"]),
            Route("/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls",
                  self._download_urls, methods=get),
            Route("/api/v1/checkpoint_files/{run_id}/{kind}/{name}/{file}", self._download_file, methods=get),
            Route("/api/v1/checkpoints", self._list_user_checkpoints, methods=get),
        ]
        # WorkbenchError: answered by Starlette's ExceptionMiddleware (no traceback: a client
        # error is one log line); anything else is a bug, logged with its traceback by uvicorn.
        app = Starlette(routes=routes, exception_handlers={WorkbenchError: self._on_error,
                                                           Exception: self._on_error})

        async def guarded(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            held: list = []  # (tenant, bytes) of body memory reserved for this request
            try:
                scope, receive = await self._admit(scope, receive, held)
                await app(scope, receive, send)
            except _Refused as refused:
                await self._refuse(scope, send, refused)
            except _Gone:
                pass  # the client left mid-body: nobody to answer
            finally:
                if held:
                    await self._release(*held)

        return guarded

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        """Errors of the request itself (not of a queued operation): a JSON body, always
        with a length, since the SDK retries an empty 400 as a network glitch."""
        error = as_error(exc)
        if isinstance(error, AuthenticationError):  # a bad download signature: guessing backs off too
            refused = await self._unknown_key(_source(request.scope), public(str(error)))
            return self._refusal(request.scope, refused)
        status = 404 if isinstance(error, NotFoundError) \
            else 429 if isinstance(error, QueueFullError) else 400 if error.category != "server" else 500
        message = public(str(error))
        self._log_error(request.scope, status, message)
        return JSONResponse({"detail": message, "error": message, "type": type(error).__name__},
                            status_code=status)

    # ------------------------------------------------------------ bounds

    async def _admit(self, scope: dict, receive: Callable, held: list) -> tuple[dict, Callable]:
        """Check the API key (before any byte of the body is read), reserve the body's
        memory in its tenant's budget, then read the body within the size limit and the read
        timeout, decompressing a zstd one as a bounded stream. Returns the scope and a
        `receive` that replays the body to the app; `held` gets the reservation."""
        started = time.monotonic()
        deadline = started + self.read_timeout_s
        headers = Headers(scope=scope)
        if scope["path"].startswith(_PUBLIC):
            return scope, receive  # no key; their handlers never read a body
        key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        tenant = self.keys.get(key)
        if tenant is None:
            raise await self._unknown_key(_source(scope))
        length = headers.get("content-length")
        if length is None and "chunked" not in headers.get("transfer-encoding", "").lower():
            return scope, receive  # no body
        if length is not None:
            if not length.strip().isdigit():
                raise _Refused(400, "Content-Length must be a number of bytes", "InvalidRequestError", close=True)
            if int(length) > self.max_body_bytes:
                raise self._too_large(f"a body of {int(length) / 2**20:.1f} MiB")
        # What the body may take: its length, or the limit when unknown or decompressed.
        need = self.max_body_bytes if length is None or headers.get("content-encoding") else int(length)
        await self._reserve(tenant, need, deadline)
        held[:] = [tenant, need]
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _Refused(408, f"request body not received within {self.read_timeout_s:g} s "
                               f"(received {size} bytes; workbench-server --tinker-read-timeout)",
                               "RequestTimeout", close=True) from None
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large("the body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding == "zstd":
            body = await asyncio.to_thread(self._unzstd, body)
        elif encoding not in ("", "identity"):
            raise _Refused(415, f"Content-Encoding {encoding!r} is not supported (zstd or none)",
                           "InvalidRequestError")
        if len(body) < need:  # held from here on: what the body really is
            await self._release(tenant, need - len(body))
            held[1] = len(body)
        if encoding:
            drop = (b"content-encoding", b"content-length", b"transfer-encoding")
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in drop]
                     + [(b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the connection's own events
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return scope, replay

    async def _reserve(self, tenant: str, need: int, deadline: float) -> None:
        """Wait (until `deadline`) for `need` bytes of the tenant's body budget: one tenant's
        uploads never hold more than `max_body_bytes_per_tenant` of server memory at once."""
        budget = self.max_body_bytes_per_tenant
        async with self._body_room:
            try:
                await asyncio.wait_for(self._body_room.wait_for(
                    lambda: self._body_bytes.get(tenant, 0) + need <= budget), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                held = self._body_bytes.get(tenant, 0) / 2**20
                raise _Refused(429, f"your requests in flight already hold {held:.1f} MiB of bodies, the most "
                               f"one tenant may ({budget / 2**20:g} MiB, 4 x workbench-server --max-message-mb); "
                               "wait for their replies", "QueueFullError", close=True) from None
            self._body_bytes[tenant] = self._body_bytes.get(tenant, 0) + need

    async def _release(self, tenant: str, need: int) -> None:
        if not need:
            return
        async with self._body_room:
            self._body_bytes[tenant] -= need
            if not self._body_bytes[tenant]:
                del self._body_bytes[tenant]
            self._body_room.notify_all()

    def _too_large(self, what: str, verb: str = "is over") -> _Refused:
        return _Refused(413, f"{what} {verb} {self.max_body_bytes / 2**20:g} MiB, this server's request "
                        "limit (workbench-server --max-message-mb); send less data per request",
                        "RequestTooLarge")

    def _unzstd(self, body: bytes) -> bytes:
        """A zstd body, decompressed as a stream that stops past `max_body_bytes` of output
        (a bomb costs at most that much memory). Runs in a worker thread."""
        import zstandard

        limit = self.max_body_bytes
        try:
            declared = zstandard.frame_content_size(body)
        except zstandard.ZstdError:
            raise _Refused(400, "body is not zstd data (Content-Encoding: zstd)", "InvalidRequestError") from None
        if declared > limit:
            raise self._too_large("the zstd body's content", "expands past")
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        parts, size = [], 0
        try:
            while True:
                part = reader.read(min(1 << 20, limit + 1 - size))
                if not part:
                    break
                size += len(part)
                if size > limit:
                    raise self._too_large("the zstd body's content", "expands past")
                parts.append(part)
        except zstandard.ZstdError as exc:
            raise _Refused(400, f"body is not valid zstd data: {exc}", "InvalidRequestError") from None
        return b"".join(parts)

    async def _unknown_key(self, source: str, message: str = "") -> _Refused:
        """A failed API key (or download signature) from `source`: the refusal, answered
        after the source's back-off delay (on this loop: other requests go on meanwhile)."""
        message = message or ("unknown API key; pass the key the server was started with (TINKER_API_KEY, "
                              "a tml-... key given to --api-key/--api-keys)")
        count, delay = self._key_backoff.failed(source)
        quiet = count & (count - 1) != 0  # logged at failures 1, 2, 4, 8, ... of a window
        if delay:
            waiting = self._key_waiting.get(source, 0)
            if waiting >= KEY_MAX_WAITING:
                return _Refused(429, f"too many requests with unknown API keys from {source}; wait "
                                f"{KEY_WINDOW_S:g} s", "AuthenticationError", close=True, quiet=quiet)
            self._key_waiting[source] = waiting + 1
            try:
                await asyncio.sleep(delay)
            finally:
                self._key_waiting[source] -= 1
                if not self._key_waiting[source]:
                    del self._key_waiting[source]
        note = f" [{count} from {source} within {KEY_WINDOW_S:g} s; answered {delay:g} s late]" if count > 1 else ""
        return _Refused(401, message, "AuthenticationError", quiet=quiet, note=note)

    def _refusal(self, scope: dict, refused: _Refused) -> Response:
        if not refused.quiet:
            self._log_error(scope, refused.status, refused.message + refused.note)
        return JSONResponse({"detail": refused.message, "error": refused.message, "type": refused.kind},
                            status_code=refused.status, headers={"connection": "close"} if refused.close else None)

    async def _refuse(self, scope: dict, send: Callable, refused: _Refused) -> None:
        async def nothing() -> dict:
            return {"type": "http.disconnect"}

        await self._refusal(scope, refused)(scope, nothing, send)

    async def _busy(self, scope: dict, receive: Callable, send: Callable) -> None:
        """The app of a connection over `max_connections`: every request on it gets 503."""
        if scope["type"] == "http":
            await self._refuse(scope, send, _Refused(
                503, f"the tinker gateway is at its limit of {self.max_connections} open connections "
                "(workbench-server --tinker-max-connections); retry shortly", "ServerBusy", close=True))

    def _log_error(self, scope: dict, status: int, message: str) -> None:
        """One line per client error (no traceback: the request was at fault, not the server)."""
        headers = Headers(scope=scope)
        tenant = self.keys.get(headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer "))
        who = f"tenant {tenant!r} at {_source(scope)}" if tenant else _source(scope)
        line = " ".join(message.split())
        self.log(f"tinker gateway: {status} {scope.get('method', '?')} {scope.get('path', '?')} "
                 f"({who}): {line[:300]}{'...' if len(line) > 300 else ''}")

    # ------------------------------------------------------------ plumbing

    def _tenant(self, request: Request) -> str:
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        tenant = self.keys.get(key)
        if tenant is None:
            raise AuthenticationError("unknown API key; pass the key the server was started with "
                                      "(TINKER_API_KEY, a tml-... key given to --api-key/--api-keys)")
        return tenant

    async def _json(self, request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:
            raise InvalidRequestError("request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        return body

    def _submit(self, tenant: str, op: str, args: dict) -> "asyncio.Future":
        """Check and queue `op` exactly as the ZeroMQ frontend does; the returned future
        resolves on this loop."""
        ops.check_args(op, args, self.limits)
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def resolve(result: Any, error: Optional[BaseException]) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

        def done(result: Any, error: Optional[BaseException]) -> None:  # on the engine thread
            self.sessions.touch_request(tenant, args)  # a long request's end is a sign of life
            try:
                loop.call_soon_threadsafe(resolve, result, error)
            except RuntimeError:
                pass  # the HTTP loop is gone (shutting down): nobody is waiting

        self.scheduler.submit(Work.of(op, tenant, args, done))
        return future

    def _future(self, tenant: str, work: Callable[[], Awaitable], encode: Callable[[Any], Any],
                resend_key: Optional[tuple] = None, **reply: Any) -> JSONResponse:
        """Start `work` as a Tinker future and answer its UntypedAPIFuture at once. A request
        with a `resend_key` seen before answers the first one's future instead (`work` is
        only called for a new request, so a resend never runs twice)."""
        if resend_key is not None and not all(isinstance(k, (int, str, type(None))) for k in resend_key):
            raise InvalidRequestError("seq_id must be an integer", "seq_id")
        if resend_key is not None and resend_key in self._idempotent:
            return JSONResponse(self._idempotent[resend_key])
        request_id = uuid.uuid4().hex
        record = _Future(tenant)

        async def run() -> None:
            try:
                outcome = encode(await awaitable)
                if isinstance(outcome, bytes):
                    record.body = outcome
                else:
                    record.result = outcome
            except Exception as exc:
                record.error = _Failed(exc)
            record.done.set()

        awaitable = work()  # may raise (e.g. queue full): then no future is recorded
        self._futures[request_id] = record
        while len(self._futures) > self.max_futures:
            self._futures.popitem(last=False)
        asyncio.get_running_loop().create_task(run())
        answer = {"request_id": request_id, **{k: v for k, v in reply.items() if v is not None}}
        if resend_key is not None:
            self._idempotent[resend_key] = answer
            while len(self._idempotent) > 8 * self.max_futures:
                self._idempotent.popitem(last=False)
        return JSONResponse(answer)

    def _model(self, tenant: str, model_id: Any) -> _Model:
        """The tenant's model `model_id`; a sign of life of its session (unparked if parked)."""
        model = self._models.get(model_id) if isinstance(model_id, str) else None
        if model is None or model.tenant != tenant:
            raise NotFoundError(f"model {model_id!r} not found (create it with create_model first)", "model_id")
        self.sessions.touch_member(tenant, model.run_id)
        return model

    async def _in_turn(self, model_id: str, seq_id: Any, submit: Callable[[], "asyncio.Future"]) -> Any:
        """Submit in the model's seq_id order, then wait for the result."""
        if not isinstance(seq_id, int) or isinstance(seq_id, bool):
            return await submit()  # unnumbered: arrival order
        sequencer = self._sequencers.setdefault(model_id, _Sequencer(self.gap_timeout_s))
        await sequencer.turn(seq_id)
        try:
            pending = submit()
        finally:
            sequencer.done(seq_id)
        return await pending

    # ------------------------------------------------------------ sessions and stubs

    async def _client_config(self, request: Request) -> Response:
        self._tenant(request)
        return JSONResponse({})  # every flag's default suits this server

    async def _create_session(self, request: Request) -> Response:
        tenant = self._tenant(request)
        session_id = self._own_session(tenant, "session-" + uuid.uuid4().hex[:16], claim=True)
        self.sessions.touch(tenant, session_id)
        return JSONResponse({"type": "create_session", "session_id": session_id})

    async def _heartbeat(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        session_id = body.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise InvalidRequestError("session_heartbeat needs session_id (a string)", "session_id")
        self._own_session(tenant, session_id, claim=True)  # an unknown id (a restart) is claimed
        if self.sessions.finished(tenant, session_id):
            # 410 Gone: the SDK ends its heartbeat loop on it.
            return JSONResponse({"detail": f"session {session_id!r} has finished"}, status_code=410)
        self.sessions.touch(tenant, session_id)  # an unknown id (e.g. after a restart) starts anew
        return JSONResponse({"type": "session_heartbeat"})

    async def _finish_session(self, request: Request) -> Response:
        tenant = self._tenant(request)
        session_id = self._own_session(tenant, request.path_params["session_id"])
        self.sessions.finish(tenant, session_id)  # its runs are parked now
        return JSONResponse({})

    async def _telemetry(self, request: Request) -> Response:
        return JSONResponse({"status": "accepted"})  # dropped: nothing leaves this machine

    async def _capabilities(self, request: Request) -> Response:
        self._tenant(request)
        models = self.capabilities().get("supported_models", [])
        return JSONResponse({"supported_models": [
            {"model_name": m.get("model_name"), "max_context_length": m.get("context_length"),
             "trainable": True, "sampleable": True} for m in models]})

    # ------------------------------------------------------------ training

    async def _create_model(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        session, seq = body.get("session_id"), body.get("model_seq_id")
        if not isinstance(session, str) or not isinstance(seq, int):
            raise InvalidRequestError("create_model needs session_id (string) and model_seq_id (int)")
        lora = body.get("lora_config") or {}
        if not isinstance(lora, dict):
            raise InvalidRequestError("lora_config must be an object", "lora_config")
        model_id = self._new_model_id(tenant, session, seq)
        args = {"base_model": body.get("base_model"), "rank": lora.get("rank", 32), "seed": lora.get("seed"),
                "train_mlp": lora.get("train_mlp", True), "train_attn": lora.get("train_attn", True),
                "train_unembed": lora.get("train_unembed", True), "user_metadata": body.get("user_metadata"),
                "session_id": session}
        if not isinstance(args["base_model"], str):
            raise InvalidRequestError("create_model needs base_model (a string)", "base_model")
        work = lambda: self._create_run(tenant, model_id, args)  # noqa: E731
        return self._future(tenant, work, lambda r: {"type": "create_model", "model_id": model_id},
                            resend_key=(tenant, "create", model_id), model_id=model_id)

    def _own_session(self, tenant: str, session_id: Any, claim: bool = False) -> str:
        """`session_id` as one of `tenant`'s sessions (kept, in use order, up to
        `max_sessions_per_tenant`). Another tenant's, or an unknown one unless `claim`, is
        "not found": one answer for both, so no tenant learns or uses another's sessions."""
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 128:
            raise InvalidRequestError("session_id must be a string of 1 to 128 characters", "session_id")
        owner = self._session_owner.get(session_id)
        if owner is None and claim:
            owner = self._session_owner[session_id] = tenant
        if owner != tenant:
            raise NotFoundError(f"session {session_id!r} not found (create_session first)", "session_id")
        mine = self._sessions_of.setdefault(tenant, OrderedDict())
        mine[session_id] = None
        mine.move_to_end(session_id)
        while len(mine) > self.max_sessions_per_tenant:
            self._session_owner.pop(mine.popitem(last=False)[0], None)
        return session_id

    def _new_model_id(self, tenant: str, session: str, seq: int) -> str:
        """The SDK's id ``<session>:train:<seq>`` of a model `tenant` creates in its session."""
        self._own_session(tenant, session)
        model_id = f"{session}:train:{seq}"
        existing = self._models.get(model_id)
        if existing is not None and existing.tenant != tenant:  # (a forgotten session reused)
            raise NotFoundError(f"session {session!r} not found (create_session first)", "session_id")
        return model_id

    async def _create_run(self, tenant: str, model_id: str, args: dict) -> dict:
        result = await self._submit(tenant, "create_model", args)
        existing = self._models.get(model_id)
        if existing is not None and existing.tenant != tenant:  # never hand over another's model
            raise NotFoundError(f"session {args.get('session_id')!r} not found (create_session first)",
                                "session_id")
        self.sessions.attach(tenant, args.get("session_id"), result["model_id"], "run")
        self._models[model_id] = _Model(tenant, result["model_id"], result["base_model"],
                                        int(result["rank"]), result.get("arch", ""))
        return result

    async def _get_info(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        model = self._model(tenant, body.get("model_id"))
        return JSONResponse({
            "type": "get_info", "model_id": body["model_id"], "is_lora": True, "lora_rank": model.rank,
            "model_data": {"arch": model.arch, "model_name": model.base_model,
                           "tokenizer_id": self.tokenizer_id(model.base_model)},
        })

    async def _forward_backward(self, request: Request) -> Response:
        tenant = self._tenant(request)
        body = await request.body()  # a zstd body arrives decompressed (`_admit`)
        try:
            decoded = tinker_proto.decode_forward_backward(body)
        except tinker_proto.ProtoInputError as exc:
            raise InvalidRequestError(exc.message, exc.where) from None
        model_id = decoded["model_id"]
        model = self._model(tenant, model_id)
        if not decoded["data"]:
            raise InvalidRequestError("data is empty: pass at least one Datum", "data")
        op = "forward" if decoded["forward_only"] else "forward_backward"
        args = {"model_id": model.run_id, "data": decoded["data"], "loss_fn": decoded["loss_fn"] or "cross_entropy",
                "loss_fn_config": decoded["loss_fn_config"]}
        work = lambda: self._in_turn(model_id, decoded["seq_id"],  # noqa: E731
                                     lambda: self._submit(tenant, op, args))

        def encode(result: dict) -> bytes:
            outputs = [{k: np.asarray(v) for k, v in o.items()} for o in result["loss_fn_outputs"]]
            return tinker_proto.encode_forward_backward_output(
                result.get("loss_fn_output_type", "target_logprobs"), outputs, _metrics(result.get("metrics")))

        return self._future(tenant, work, encode, resend_key=(tenant, model_id, decoded["seq_id"]),
                            model_id=model_id)

    async def _optim_step(self, request: Request) -> Response:
        from workbench.types import AdamParams

        tenant, body = self._tenant(request), await self._json(request)
        model_id = body.get("model_id")
        model = self._model(tenant, model_id)
        params = body.get("adam_params") or body.get("optim_params")
        if not isinstance(params, dict) or params.get("type", "adam") not in ("adam", "adamw"):
            raise InvalidRequestError("optim_step needs adam_params (this server runs AdamW only)", "adam_params")
        try:
            adam = AdamParams(**{k: v for k, v in params.items() if k != "type"}).model_dump()
        except Exception as exc:
            raise InvalidRequestError(f"bad adam_params: {exc}", "adam_params") from None
        args = {"model_id": model.run_id, "adam_params": adam}
        work = lambda: self._in_turn(model_id, body.get("seq_id"),  # noqa: E731
                                     lambda: self._submit(tenant, "optim_step", args))
        return self._future(tenant, work, lambda r: {"metrics": _metrics(r.get("metrics"))},
                            resend_key=(tenant, model_id, body.get("seq_id")), model_id=model_id)

    async def _save_weights(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        model_id = body.get("model_id")
        model = self._model(tenant, model_id)
        args = {"model_id": model.run_id, "name": body.get("path")}
        work = lambda: self._in_turn(model_id, body.get("seq_id"),  # noqa: E731
                                     lambda: self._submit(tenant, "save_state", args))
        return self._future(tenant, work, lambda r: {"type": "save_weights", "path": to_tinker(r["path"])},
                            resend_key=(tenant, model_id, body.get("seq_id")), model_id=model_id)

    async def _unload_model(self, request: Request) -> Response:
        """Tinker's UnloadModelRequest: the run's adapter and optimizer state are freed after
        its queued work; its checkpoints stay."""
        tenant, body = self._tenant(request), await self._json(request)
        model_id = body.get("model_id")
        model = self._model(tenant, model_id)
        args = {"model_id": model.run_id}
        work = lambda: self._in_turn(model_id, body.get("seq_id"),  # noqa: E731
                                     lambda: self._submit(tenant, "unload_model", args))
        return self._future(tenant, work, lambda r: {"type": "unload_model", "model_id": model_id},
                            resend_key=(tenant, model_id, body.get("seq_id"), "unload"), model_id=model_id)

    async def _load_weights(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        path, optimizer = to_wb(body.get("path")), bool(body.get("optimizer"))
        if body.get("model_id") is None:  # a new model from a state: the SDK derives its id
            session, seq = body.get("session_id"), body.get("model_seq_id")
            if not isinstance(session, str) or not isinstance(seq, int):
                raise InvalidRequestError("load_weights needs model_id, or session_id and model_seq_id")
            model_id = self._new_model_id(tenant, session, seq)
            args = {"base_model": "", "from_state": path, "optimizer": optimizer, "session_id": session}
            work = lambda: self._create_run(tenant, model_id, args)  # noqa: E731
            return self._future(tenant, work, lambda r: {"type": "load_weights", "model_id": model_id,
                                                         "path": to_tinker(path)},
                                resend_key=(tenant, "create", model_id), model_id=model_id)
        model_id = body["model_id"]
        model = self._model(tenant, model_id)
        args = {"model_id": model.run_id, "path": path, "optimizer": optimizer}
        work = lambda: self._in_turn(model_id, body.get("seq_id"),  # noqa: E731
                                     lambda: self._submit(tenant, "load_state", args))
        return self._future(tenant, work, lambda r: {"type": "load_weights", "path": to_tinker(path)},
                            resend_key=(tenant, model_id, body.get("seq_id")), model_id=model_id)

    async def _save_for_sampler(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        model_id = body.get("model_id")
        model = self._model(tenant, model_id)
        name = body.get("path")
        # No name: an ephemeral snapshot whose future carries a sampling session on it.
        args = {"model_id": model.run_id, "name": name or f"ephemeral-{uuid.uuid4().hex[:12]}"}

        async def work() -> dict:
            saved = await self._in_turn(model_id, body.get("seq_id"),
                                        lambda: self._submit(tenant, "save_weights_for_sampler", args))
            reply = {"type": "save_weights_for_sampler", "path": to_tinker(saved["path"])}
            if not name:
                reply["sampling_session_id"] = await self._new_sampler(
                    tenant, {"model_path": saved["path"]}, self.sessions.session_of(tenant, model.run_id))
            return reply

        return self._future(tenant, work, lambda r: r, resend_key=(tenant, model_id, body.get("seq_id")),
                            model_id=model_id)

    # ------------------------------------------------------------ sampling

    async def _new_sampler(self, tenant: str, args: dict, session_id: Optional[str]) -> str:
        """A sampling session; one on a checkpoint (an adapter) joins `session_id`'s parking."""
        result = await self._submit(tenant, "create_sampling_session", args)
        if args.get("model_path"):
            self.sessions.attach(tenant, session_id, result["sampler_id"], "sampler")
        self._samplers[result["sampler_id"]] = {
            "tenant": tenant, "base_model": result["base_model"], "model_path": to_tinker(args.get("model_path"))}
        return result["sampler_id"]

    async def _create_sampling_session(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        if body.get("session_id") is not None:
            self._own_session(tenant, body["session_id"])
        key = (tenant, "sampler", body.get("session_id"), body.get("sampling_session_seq_id"))
        if not isinstance(key[3], (int, str, type(None))):
            raise InvalidRequestError("sampling_session_seq_id must be an integer", "sampling_session_seq_id")
        if key in self._idempotent:
            return JSONResponse(self._idempotent[key])
        if body.get("model_path"):
            args = {"model_path": to_wb(body["model_path"], "model_path")}
        elif isinstance(body.get("base_model"), str):
            args = {"base_model": body["base_model"]}
        else:
            raise InvalidRequestError("create_sampling_session needs model_path or base_model", "model_path")
        session_id = body.get("session_id")
        sampler_id = await self._new_sampler(tenant, args, session_id if isinstance(session_id, str) else None)
        self._idempotent[key] = {"type": "create_sampling_session", "sampling_session_id": sampler_id}
        return JSONResponse(self._idempotent[key])

    async def _get_sampler(self, request: Request) -> Response:
        tenant = self._tenant(request)
        sampler_id = request.path_params["sampler_id"]
        sampler = self._samplers.get(sampler_id)
        if sampler is None or sampler["tenant"] != tenant:
            raise NotFoundError(f"sampling session {sampler_id!r} not found", "sampler_id")
        self.sessions.touch_member(tenant, sampler_id)
        return JSONResponse({"sampler_id": sampler_id, "base_model": sampler["base_model"],
                             "model_path": sampler["model_path"]})

    async def _asample(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        sampler_id = body.get("sampling_session_id")
        if not isinstance(sampler_id, str):
            raise InvalidRequestError("asample needs sampling_session_id (create_sampling_session first)",
                                      "sampling_session_id")
        self.sessions.touch_member(tenant, sampler_id)  # unparked before its sample is queued
        args = {"sampler_id": sampler_id, "prompt": np.asarray(_prompt_tokens(body.get("prompt")), dtype=np.int32),
                "num_samples": body.get("num_samples", 1), "sampling_params": body.get("sampling_params") or {},
                "include_prompt_logprobs": bool(body.get("prompt_logprobs"))}
        num_samples = args["num_samples"]
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidRequestError(f"num_samples must be a positive integer, got {num_samples!r}", "num_samples")
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(unsupported):
                raise InvalidRequestError(f"{unsupported} is not supported by this server", unsupported)
        if body.get("target_prompt_logprobs") is not None:
            raise InvalidRequestError("target_prompt_logprobs is not supported by this server",
                                      "target_prompt_logprobs")
        last_n = body.get("prompt_logprobs_last_n")

        def encode(result: dict) -> bytes:
            prompt_logprobs = result.get("prompt_logprobs")
            if prompt_logprobs is not None and last_n:
                prompt_logprobs = [None] * (len(prompt_logprobs) - last_n) + list(prompt_logprobs[-last_n:])
            return tinker_proto.encode_sample_response(result["sequences"], prompt_logprobs)

        seq_id = body.get("seq_id")
        request_key = (tenant, "sample", sampler_id, seq_id) if seq_id is not None else None
        prior = self._idempotent.get(request_key) if request_key else None
        sequence_ids = prior["sample_sequence_ids"] if prior else [uuid.uuid4().hex for _ in range(num_samples)]
        return self._future(tenant, lambda: self._submit(tenant, "sample", args), encode,
                            resend_key=request_key, sample_sequence_ids=sequence_ids)

    # ------------------------------------------------------------ futures

    async def _retrieve_future(self, request: Request) -> Response:
        tenant, body = self._tenant(request), await self._json(request)
        request_id = body.get("request_id")
        record = self._futures.get(request_id) if isinstance(request_id, str) else None
        if record is None or record.tenant != tenant:
            raise NotFoundError(f"future {request_id!r} not found (unknown, or its result was dropped "
                                f"after {self.max_futures} newer ones)", "request_id")
        try:
            await asyncio.wait_for(record.done.wait(), self.hold_s)
        except asyncio.TimeoutError:
            return JSONResponse({
                "type": "try_again", "request_id": request_id, "queue_state": "active",
                "queue_state_reason": f"queued: server cycle {self.scheduler.cycle}, "
                                      f"{self.scheduler.queue_depth()} requests waiting, "
                                      f"{self.scheduler.queue_depth_by_tenant().get(tenant, 0)} of them yours",
            }, status_code=408)
        if record.error is not None:
            return JSONResponse({"error": str(record.error), "category": record.error.category})
        if record.body is not None:
            return Response(record.body, media_type=_PROTO)
        return JSONResponse(record.result)

    # ------------------------------------------------------------ runs and checkpoints

    async def _rest(self, request: Request, op: str, args: dict) -> Any:
        tenant = self._tenant(request)
        return await self._submit(tenant, op, args)

    def _run_id(self, request: Request) -> str:
        """A training run named by our run id or by the SDK's model id."""
        name = request.path_params["run_id"]
        model = self._models.get(name)
        # Only the tenant's own model ids are resolved: another's stays a name it cannot open.
        return model.run_id if model is not None and model.tenant == self._tenant(request) else name

    def _page(self, request: Request) -> dict:
        try:
            return {"limit": int(request.query_params.get("limit", 20)),
                    "offset": int(request.query_params.get("offset", 0))}
        except ValueError:
            raise InvalidRequestError("limit and offset must be integers") from None

    async def _list_runs(self, request: Request) -> Response:
        result = await self._rest(request, "list_training_runs", self._page(request))
        return JSONResponse({"training_runs": [_run_record(r) for r in result["training_runs"]],
                             "cursor": result["cursor"]})

    async def _get_run(self, request: Request) -> Response:
        result = await self._rest(request, "get_training_run", {"run_id": self._run_id(request)})
        return JSONResponse(_run_record(result))

    async def _list_checkpoints(self, request: Request) -> Response:
        result = await self._rest(request, "list_checkpoints", {"run_id": self._run_id(request)})
        return JSONResponse({"checkpoints": [_checkpoint(c) for c in result["checkpoints"]],
                             "cursor": result.get("cursor")})

    async def _list_user_checkpoints(self, request: Request) -> Response:
        result = await self._rest(request, "list_user_checkpoints", self._page(request))
        return JSONResponse({"checkpoints": [_checkpoint(c) for c in result["checkpoints"]],
                             "cursor": result.get("cursor")})

    def _path(self, request: Request) -> str:
        params = request.path_params
        return f"{WB}{self._run_id(request)}/{params['kind']}/{params['name']}"

    async def _delete_checkpoint(self, request: Request) -> Response:
        await self._rest(request, "delete_checkpoint", {"path": self._path(request)})
        return Response(status_code=204)

    def _signature(self, tenant: str, path: str, expires: int) -> str:
        return hmac.new(self._sign_key, f"{tenant}\n{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    async def _download_urls(self, request: Request) -> Response:
        """Signed per-file URLs (the SDK's download fetches them without its API key)."""
        tenant = self._tenant(request)
        path = self._path(request)
        files = (await self._submit(tenant, "get_checkpoint_files", {"path": path}))["files"]
        expires = int(time.time()) + 3600
        base = str(request.base_url).rstrip("/")
        rel = path[len(WB):]
        urls = {name: f"{base}/api/v1/checkpoint_files/{rel}/{name}?tenant={tenant}&expires={expires}"
                      f"&sig={self._signature(tenant, f'{rel}/{name}', expires)}" for name in files}
        return JSONResponse({"urls": urls, "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))})

    async def _download_file(self, request: Request) -> Response:
        p, q = request.path_params, request.query_params
        rel = f"{p['run_id']}/{p['kind']}/{p['name']}"
        expires_text = q.get("expires", "0") or "0"
        tenant, expires = q.get("tenant", ""), int(expires_text) if expires_text.isdigit() else 0
        if expires < time.time() or not hmac.compare_digest(
                q.get("sig", ""), self._signature(tenant, f"{rel}/{p['file']}", expires)):
            raise AuthenticationError("download link is invalid or expired; ask for new external_weights_urls")
        files = (await self._submit(tenant, "get_checkpoint_files", {"path": WB + rel}))["files"]
        if p["file"] not in files:
            raise NotFoundError(f"checkpoint {TINKER}{rel} has no file {p['file']!r}", "file")
        return Response(bytes(files[p["file"]]), media_type="application/octet-stream")


def _prompt_tokens(prompt: Any) -> list[int]:
    """A ModelInput's JSON ({"chunks": [{"type": "encoded_text", "tokens": [...]}, ...]}) as tokens."""
    chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
    if not isinstance(chunks, list):
        raise InvalidRequestError("prompt must be a ModelInput {chunks: [...]}", "prompt")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text" \
                or not isinstance(chunk.get("tokens"), list):
            raise InvalidRequestError("only encoded_text chunks (token lists) are supported by this server",
                                      f"prompt.chunks[{i}]")
        tokens.extend(int(t) for t in chunk["tokens"])
    return tokens


def tokenizer_id(name: str) -> str:
    """What get_info reports as model_data.tokenizer_id: a local directory the client's
    AutoTokenizer can load offline (built-in tiny models, local model directories, a GGUF
    model's converted directory, e.g. smollm2-135m's), else the hub id itself (then the
    client needs it in its own cache)."""
    from .engine.models import model_source

    return model_source(name)[0]
