"""`workbench-server` (also `python -m server`): the multi-LoRA training server.

Prints exactly one line ``workbench-server ready url=<url>`` on stdout once it accepts
requests (with ``curve_public_key=<z85>`` appended when --curve-secret-file turns CURVE
encryption on); everything else goes to stderr.

Stopping: on SIGTERM (or SIGINT) the server finishes the cycle under way, answers every
request still queued with a "server is shutting down" error, then saves every live training
run's state (weights + optimizer) as ``wb://<run_id>/weights/autosave-shutdown`` and exits 0.
A later server on the same --store resumes from it with
``create_training_client_from_state_with_optimizer``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

AUTOSAVE_NAME = "autosave-shutdown"  # wb://<run_id>/weights/autosave-shutdown
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench-server",
        description="Serve LoRA training and sampling of many users' adapters on one frozen "
        "base model, over ZeroMQ.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=7788,
                        help="TCP port of the request socket; 0 picks a free one (default 7788)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the engine runs: auto = cuda when available, else cpu")
    parser.add_argument("--models", default="",
                        help="comma list of base models to load at start (built-in names: tiny-qwen3, "
                        "tiny-llama, smollm2-135m; a .gguf file, converted once into a cache; local "
                        "model directories; cached hub ids); others load on first use")
    parser.add_argument("--cycle-ms", type=int, default=0,
                        help="0: the next cycle starts as soon as the last ended and work is "
                        "queued; N: a fixed clock of N milliseconds")
    parser.add_argument("--store", default=None,
                        help="directory for runs and checkpoints (default: the user data directory)")
    parser.add_argument("--api-key", default=None,
                        help="the single API key accepted (tenant 'default'); also WORKBENCH_API_KEY")
    parser.add_argument("--api-keys", default=None,
                        help="JSON file mapping API key -> tenant name, for several tenants")
    parser.add_argument("--token-budget", type=int, default=4096,
                        help="max tokens packed into one engine pass (micro-batch)")
    parser.add_argument("--queue-limit", type=int, default=256,
                        help="max queued requests per tenant before 'queue full' errors")
    parser.add_argument("--cycle-tokens", type=int, default=65536,
                        help="engine tokens (trained + sampled) per cycle, split equally between the tenants that "
                        "have work, so one flooding tenant cannot starve the others; 0 = no cap "
                        "(default 65536)")
    parser.add_argument("--tenant-quantum", type=int, default=4096,
                        help="while several tenants have work, the most engine tokens one takes of "
                        "a cycle (its first request excepted), so one tenant's backlog stretches "
                        "another's step by at most this much work per cycle; 0 = only "
                        "--cycle-tokens (default 4096)")
    parser.add_argument("--session-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="park the runs and checkpoint samplers of a session (a workbench "
                        "client, or a tinker SDK session on --tinker-port) silent for this long: "
                        "state kept, adapters evicted from the accelerator until its next request "
                        "(default 120)")
    parser.add_argument("--max-message-mb", type=float, default=256.0,
                        help="largest request accepted, in MiB; a larger one gets an error "
                        "reply, one with a single frame over twice this is dropped (default 256)")
    parser.add_argument("--max-rank", type=int, default=128,
                        help="largest LoRA rank a run may ask for (default 128)")
    parser.add_argument("--max-samples", type=int, default=256,
                        help="largest num_samples of one sample request (default 256)")
    parser.add_argument("--max-request-tokens", type=int, default=1 << 20,
                        help="most engine tokens one request may cost: a forward_backward's tokens, "
                        "a sample's prompt + max_tokens * num_samples (default 1048576)")
    parser.add_argument("--max-runs-per-tenant", type=int, default=64,
                        help="most live training runs one tenant may hold (unload_model frees one; "
                        "its checkpoints stay), and most checkpoint samplers it keeps loaded (beyond "
                        "that its least recently used one is read from its checkpoint again when "
                        "next used) (default 64)")
    parser.add_argument("--max-resident-adapters", type=int, default=None,
                        help="most adapters kept on the accelerator; the least recently used "
                        "others wait, state kept, in host memory until used (default: no limit)")
    parser.add_argument("--max-host-adapters", type=int, default=64,
                        help="most adapters waiting in host memory (parked: beyond "
                        "--max-resident-adapters, or of a silent session); the least recently "
                        "parked spill to files under the store until used (default 64)")
    parser.add_argument("--rewind-depth", type=int, default=4, metavar="N",
                        help="optim_steps of each training run that TrainingClient.rewind can "
                        "undo: the run's state before each of its last N steps is kept in host "
                        "memory, 12 bytes per LoRA parameter per step (fp32 weights + both Adam "
                        "moments: about 9 MB for tiny-qwen3 at rank 32, about 1.1 GB for "
                        "Qwen3-8B at rank 32 on every linear layer and the head); written to the "
                        "spill file with a spilled run, dropped by a checkpoint load; 0 turns "
                        "rewind off (default 4)")
    parser.add_argument("--reply-cache-mb", type=float, default=256.0,
                        help="memory for replies kept so that a resent request id gets its reply "
                        "again instead of a second execution; a reply larger than this is sent "
                        "once and not kept (a resend gets an error saying so) (default 256)")
    parser.add_argument("--tinker-port", type=int, default=None, metavar="PORT",
                        help="also serve Tinker's HTTP protocol (the official tinker SDK, with a "
                        "tml-... key) on this port of --host; 0 picks a free one (default: off). "
                        "This is plain HTTP, not covered by --curve-secret-file: on a "
                        "non-loopback --host, keys and data cross the network unencrypted "
                        "(put a TLS proxy in front, or an SSH tunnel)")
    parser.add_argument("--tinker-max-connections", type=int, default=1024, metavar="N",
                        help="open connections the --tinker-port gateway serves; requests on more "
                        "get HTTP 503 (the SDK retries), beyond twice this new connections are "
                        "closed at once (default 1024; its bodies are limited by --max-message-mb)")
    parser.add_argument("--tinker-read-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a --tinker-port request's head must arrive within this of its "
                        "connection opening (or of the previous reply), and its body within this "
                        "of the head: else HTTP 408 and the connection is closed (default 30)")
    parser.add_argument("--curve-secret-file", default=None, metavar="PATH",
                        help="encrypt the request and event sockets with ZeroMQ CURVE: PATH holds "
                        "the server's z85 secret key (created, mode 0600, with a fresh keypair if "
                        "missing). The public key is written to PATH.pub and printed in the "
                        "ready line as curve_public_key=...; clients pass it as "
                        "ServiceClient(server_public_key=...) or WORKBENCH_SERVER_KEY, and a "
                        "client without it gets no answer. Recommended whenever --host is not "
                        "loopback")
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                        help=argparse.SUPPRESS)  # used by the embedded local server
    return parser


def load_keys(args: argparse.Namespace) -> dict[str, str]:
    keys: dict[str, str] = {}
    if args.api_keys:
        try:
            mapping = json.loads(Path(args.api_keys).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"--api-keys {args.api_keys}: cannot read a JSON object: {exc}")
        if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise SystemExit(f"--api-keys {args.api_keys}: expected a JSON object of key -> tenant name")
        keys.update(mapping)
    key = args.api_key or os.environ.get("WORKBENCH_API_KEY")
    if key:
        keys[key] = "default"
    if not keys:
        raise SystemExit("no API key: pass --api-key KEY, --api-keys FILE or set WORKBENCH_API_KEY")
    return keys


def default_store() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("tinker-workbench")) / "store"


def _watch_parent(pid: int, stop) -> None:
    """Exit when the process that started us is gone (also after a SIGKILL of it)."""
    while not stop.wait(0.5):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stop.set()
            return
        if os.getppid() != pid:
            stop.set()
            return


def warn_if_exposed(host: str, args: argparse.Namespace) -> None:
    """Loud warning when a non-loopback address is bound without an explicit key, or without
    CURVE encryption (API keys and data would cross the network in clear text)."""
    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return
    problems = []
    if not (args.api_key or args.api_keys):
        problems.append("no --api-key / --api-keys was given (the key comes from the "
                        "environment).\nAnyone who learns the key can train and sample on this "
                        "machine. Pass an explicit\n--api-key or --api-keys FILE, or bind --host "
                        "127.0.0.1.")
    if not args.curve_secret_file:
        problems.append("traffic is NOT encrypted: API keys, data and weights cross the network "
                        "in clear text.\nTurn on CURVE encryption with --curve-secret-file PATH "
                        "(clients then pass\nserver_public_key= or set WORKBENCH_SERVER_KEY to the "
                        "printed curve_public_key).")
    if args.tinker_port is not None:
        problems.append("the --tinker-port gateway is plain HTTP, never encrypted: keep it on "
                        "loopback\nor behind a TLS proxy.")
    if not problems:
        return
    bar = "!" * 78
    body = "\n".join(f"- {p}" for p in problems)
    print(f"{bar}\nWARNING: workbench-server is listening on {host}, reachable from other "
          f"machines, and\n{body}\n{bar}", file=sys.stderr, flush=True)


def load_curve_secret(path_arg: str, log) -> bytes:
    """The server's z85 CURVE secret key from PATH, creating PATH (mode 0600, a fresh
    keypair) if it does not exist; (re)writes the public key to PATH.pub for clients."""
    import zmq

    from workbench.wire import check_curve_key

    path = Path(os.path.expanduser(path_arg))
    if not path.exists():
        public, secret = zmq.curve_keypair()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: never overwrite a secret another server wrote in the meantime.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret.decode() + "\n")
        except OSError as exc:
            raise SystemExit(f"--curve-secret-file {path}: cannot create it: {exc}")
        log(f"created CURVE secret key {path} (mode 0600)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"--curve-secret-file {path}: cannot read it: {exc}")
    try:
        secret = check_curve_key(text, f"--curve-secret-file {path}", hint=(
            "the file must hold the server's 40-character z85 secret key; delete it to have a "
            "fresh keypair made (clients then need the new public key)"))
    except ValueError as exc:
        raise SystemExit(str(exc))
    if path.stat().st_mode & 0o077:
        log(f"warning: {path} is readable by other users (chmod 600 it): whoever reads it can "
            "impersonate this server")
    public = zmq.curve_public(secret)
    try:
        Path(f"{path}.pub").write_text(public.decode() + "\n")
    except OSError as exc:
        raise SystemExit(f"--curve-secret-file {path}: cannot write the public key to {path}.pub: {exc}")
    return secret


def autosave(runner, log) -> list[str]:
    """Save every live training run's state into the store; returns the wb:// paths."""
    paths = []
    for run in list(runner.runs.values()):
        try:
            paths.append(runner.save(run, AUTOSAVE_NAME, with_optimizer=True))
        except Exception as exc:  # one run that cannot be saved must not lose the others
            log(f"autosave of {run.run_id} failed: {type(exc).__name__}: {exc}")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = load_keys(args)
    if args.max_message_mb <= 0 or args.session_timeout <= 0 or args.max_rank < 1:
        raise SystemExit("--max-message-mb and --session-timeout must be > 0, --max-rank >= 1")
    for flag in ("max_samples", "max_request_tokens", "max_runs_per_tenant"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_resident_adapters is not None and args.max_resident_adapters < 1:
        raise SystemExit("--max-resident-adapters must be >= 1")
    if args.max_host_adapters < 0 or args.rewind_depth < 0:
        raise SystemExit("--max-host-adapters and --rewind-depth must be >= 0")
    if args.reply_cache_mb < 0:
        raise SystemExit("--reply-cache-mb must be >= 0")

    # Heavy imports after argument parsing, so --help is instant.
    from .capabilities import Capabilities
    from .engine.engine import Engine
    from .frontend import Frontend
    from .ops import Limits
    from .runner import CycleRunner
    from .scheduler import Scheduler, cancel_session, finish, run_loop
    from .sessions import Sessions
    from .store import Store
    from workbench.errors import ServerError
    from workbench.wire import READY_PREFIX

    log = lambda msg: print(f"[workbench-server] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    # transformers' per-file "Loading weights" bars would fill a notebook cell with red stderr
    # at every model load; the server says what it loads in one line instead.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Before the engine starts, so a bad key file fails in a second, not after model loading.
    curve_secret = load_curve_secret(args.curve_secret_file, log) if args.curve_secret_file else None
    store_root = Path(args.store) if args.store else default_store()
    # Spill files hold parked adapters of this process only: a previous one's are stale.
    spill_dir = store_root / ".spill"
    shutil.rmtree(spill_dir, ignore_errors=True)
    try:
        engine = Engine(device=args.device, token_budget=args.token_budget,
                        max_resident_adapters=args.max_resident_adapters,
                        max_host_adapters=args.max_host_adapters, spill_dir=str(spill_dir),
                        rewind_depth=args.rewind_depth)
    except ValueError as exc:
        raise SystemExit(str(exc))
    for name in filter(None, (m.strip() for m in args.models.split(","))):
        try:
            engine.load_model(name)
        except ValueError as exc:
            raise SystemExit(f"--models: {exc}")
        log(f"loaded {name} on {engine.device}")
    store = Store(store_root)
    scheduler = Scheduler(queue_limit=args.queue_limit, cycle_tokens=args.cycle_tokens,
                          tenant_quantum=args.tenant_quantum)
    runner = CycleRunner(engine, store, max_runs_per_tenant=args.max_runs_per_tenant)
    capabilities = Capabilities(engine, args.max_rank, args.cycle_ms)
    limits = Limits(max_rank=args.max_rank, max_samples=args.max_samples,
                    max_request_tokens=args.max_request_tokens)
    # One book of client sessions for both frontends. A session's events go to its tenant
    # only; its end (goodbye or silence) cancels its requests still queued.
    sessions = Sessions(args.session_timeout, on_park=runner.park,
                        publish_to=lambda tenant, event: frontend.publish("session", event, tenant),
                        on_gone=lambda tenant, session, members: cancel_session(scheduler, tenant, session, members))
    frontend = Frontend(
        scheduler, keys,
        info=lambda: {"models": capabilities.model_names, "device": str(engine.device)},
        max_message_bytes=int(args.max_message_mb * 2**20), sessions=sessions,
        limits=limits, capabilities=capabilities.response,
        reply_cache_bytes=int(args.reply_cache_mb * 2**20),
    )
    warn_if_exposed(args.host, args)
    try:
        url = frontend.bind(args.host, args.port, curve_secret_key=curve_secret)
    except Exception as exc:
        raise SystemExit(f"cannot bind tcp://{args.host}:{args.port}: {exc}")

    gateway = None
    if args.tinker_port is not None:
        from .tinker_http import TinkerGateway, tokenizer_id

        if args.tinker_max_connections < 1 or args.tinker_read_timeout <= 0:
            raise SystemExit("--tinker-max-connections must be >= 1, --tinker-read-timeout > 0")
        gateway = TinkerGateway(scheduler, keys, capabilities.response, tokenizer_id, limits=limits,
                                sessions=sessions, max_body_bytes=int(args.max_message_mb * 2**20),
                                max_connections=args.tinker_max_connections,
                                read_timeout_s=args.tinker_read_timeout, log=log)
        try:
            log(f"tinker gateway {gateway.start(args.host, args.tinker_port)}")
        except OSError as exc:
            raise SystemExit(f"cannot bind --tinker-port {args.tinker_port} on {args.host}: {exc}")

    stop = threading.Event()
    engine_thread = threading.Thread(
        target=run_loop, name="engine",
        args=(scheduler, runner.execute, stop, args.cycle_ms, lambda ev: frontend.publish("cycle", ev)),
        kwargs={"idle": runner.apply_parking},
    )
    engine_thread.start()

    def shut_down() -> None:
        stop.wait()
        scheduler.wake()
        engine_thread.join()  # the cycle under way finishes and replies
        for work in scheduler.close():
            finish(work, error=ServerError("the server is shutting down; this request was not run"))
        saved = autosave(runner, log)
        log(f"saved {len(saved)} training run(s) as wb://<run_id>/weights/{AUTOSAVE_NAME}")
        frontend.stop()  # after the replies above are queued: serve() flushes them
        if gateway is not None:
            gateway.stop()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(args.exit_with_parent, stop), daemon=True).start()
    threading.Thread(target=shut_down, name="shutdown", daemon=True).start()

    log(f"store {store.root}, device {engine.device}, events {frontend.events_url}")
    ready = f"{READY_PREFIX}{url}"  # clients parse this start (parse_ready_line): keep it first
    if curve_secret is not None:
        import zmq

        ready += f" curve_public_key={zmq.curve_public(curve_secret).decode()}"
    print(ready, flush=True)
    frontend.serve()  # returns after shut_down() stops it
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
