"""`workbench-server` (also `python -m server`): the multi-LoRA training server.

Prints exactly one line ``workbench-server ready url=<url>`` on stdout once it accepts
requests; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path


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
                        help="comma list of base models to load at start (built-in names like "
                        "tiny-qwen3, local model directories, cached hub ids); others load on first use")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = load_keys(args)

    # Heavy imports after argument parsing, so --help is instant.
    from .engine.engine import Engine
    from .engine.models import available_models
    from .frontend import Frontend
    from .runner import CycleRunner
    from .scheduler import Scheduler, run_loop
    from .store import Store

    log = lambda msg: print(f"[workbench-server] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        engine = Engine(device=args.device, token_budget=args.token_budget)
    except ValueError as exc:
        raise SystemExit(str(exc))
    for name in filter(None, (m.strip() for m in args.models.split(","))):
        try:
            engine.load_model(name)
        except ValueError as exc:
            raise SystemExit(f"--models: {exc}")
        log(f"loaded {name} on {engine.device}")
    store = Store(Path(args.store) if args.store else default_store())
    scheduler = Scheduler(queue_limit=args.queue_limit)
    runner = CycleRunner(engine, store)
    models = available_models()
    frontend = Frontend(scheduler, keys, info=lambda: {"models": models, "device": str(engine.device)})
    try:
        url = frontend.bind(args.host, args.port)
    except Exception as exc:
        raise SystemExit(f"cannot bind tcp://{args.host}:{args.port}: {exc}")

    stop = threading.Event()
    engine_thread = threading.Thread(
        target=run_loop, name="engine",
        args=(scheduler, runner.execute, stop, args.cycle_ms, lambda ev: frontend.publish("cycle", ev)),
    )
    engine_thread.start()

    def shutdown(*_):
        stop.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(args.exit_with_parent, stop), daemon=True).start()
    threading.Thread(target=lambda: (stop.wait(), scheduler.wake(), frontend.stop()), daemon=True).start()

    log(f"store {store.root}, device {engine.device}, events {frontend.events_url}")
    print(f"workbench-server ready url={url}", flush=True)
    frontend.serve()  # returns after stop
    engine_thread.join()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
