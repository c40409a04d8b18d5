"""Load and abuse: an honest tenant's training steps beside an abusive tenant, on a real server.

Starts a real `workbench-server` (two tenants, loopback ZeroMQ) and runs the honest tenant's
loop (forward_backward + optim_step submitted back to back, then waited for) alone, then
beside each abuse in turn. Prints one JSON line per phase: the honest tenant's step latency
(p50 / p99, and p50 over the alone p50), its requests lost (failed or unanswered) and
duplicated (steps counted by the server beyond those sent), whether its loss stayed finite,
and the server's peak resident memory during the phase.

    python benchmarks/bench_abuse.py --device cpu
    python benchmarks/bench_abuse.py --device cuda --steps 50
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from _machine import arg_parser, device_and_dtype, emit, machine

ABUSES = ("diverged", "malformed", "huge_samples", "million_samples", "backlog", "wrong_keys")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples a process's resident memory every 20 ms while in a `with` block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> "PeakRSS":
        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb(self.pid))
                self._stop.wait(0.02)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def datum(types, tokens):
    tokens = [int(t) for t in tokens]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def abuse(kind: str, url: str, stop: threading.Event, model: str, seq_len: int) -> None:
    """Run one abuse until `stop` is set (the abuser's key is "abuser")."""
    import workbench as wb
    from workbench import types

    rng = np.random.default_rng(1)
    service = wb.ServiceClient(base_url=url, api_key="abuser")
    if kind in ("diverged", "backlog", "malformed"):
        run = service.create_lora_training_client(base_model=model, rank=8, seed=1)
    if kind == "diverged":  # an overflowing learning rate, then keep training beside the honest tenant
        run.forward_backward([datum(types, rng.integers(0, 1000, seq_len // 2))], "cross_entropy").result()
        run.optim_step(types.AdamParams(learning_rate=1e30)).result()
        while not stop.is_set():
            run.forward_backward([datum(types, rng.integers(0, 1000, seq_len // 2))], "cross_entropy").result()
            try:
                run.optim_step(types.AdamParams(learning_rate=1e30)).result()
            except Exception:
                pass  # refused: its own gradients are not finite
    elif kind == "backlog":  # keep 200 requests queued at all times (the queue limit is 256)
        pending: list = []
        while not stop.is_set():
            while len(pending) < 200:
                pending.append(run.forward_backward([datum(types, rng.integers(0, 1000, seq_len))], "cross_entropy"))
            pending.pop(0).result()
    elif kind == "malformed":  # a 2-D tokens array the SDK's clients would never send
        from workbench.connection import connection_for

        bad = [{"tokens": np.arange(10, dtype=np.int32).reshape(2, 5),
                "loss_fn_inputs": {"target_tokens": np.arange(2), "weights": np.ones(2, np.float32)}}]
        wire_level = connection_for(url, "abuser")
        while not stop.is_set():
            try:
                wire_level.call("forward_backward", {"model_id": run.model_id, "data": bad,
                                                     "loss_fn": "cross_entropy"}).result()
            except Exception:
                pass  # refused at the border
    elif kind in ("huge_samples", "million_samples"):
        sampler = service.create_sampling_client(base_model=model)
        n = 1_000_000 if kind == "million_samples" else 256  # the server's --max-samples default
        while not stop.is_set():
            try:
                sampler.sample(types.ModelInput.from_ints([1, 2, 3]), n, types.SamplingParams(max_tokens=32)).result()
            except Exception:
                pass  # refused at the border
    elif kind == "wrong_keys":  # a key guesser: every guess a fresh connection
        while not stop.is_set():
            try:
                wb.ServiceClient(base_url=url, api_key="not-a-key-" + uuid.uuid4().hex)
            except Exception:
                pass
    service.close()


def honest_phase(url: str, model: str, steps: int, seq_len: int) -> dict:
    import workbench as wb
    from workbench import types

    rng = np.random.default_rng(0)
    service = wb.ServiceClient(base_url=url, api_key="honest")
    run = service.create_lora_training_client(base_model=model, rank=8, seed=0)
    data = [datum(types, rng.integers(0, 1000, seq_len)), datum(types, rng.integers(0, 1000, seq_len // 2))]
    latencies, lost, finite, last_step = [], 0, True, 0
    for _ in range(steps):
        start = time.perf_counter()
        fb = run.forward_backward(data, "cross_entropy")
        op = run.optim_step(types.AdamParams(learning_rate=1e-4))
        try:
            loss = fb.result(300).metrics["loss:sum"]
            last_step = int(op.result(300).metrics["step:max"])
            finite = finite and bool(np.isfinite(loss))
        except Exception:
            lost += 1
        latencies.append(time.perf_counter() - start)
    return {"p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
            "lost": lost, "duplicates": max(0, last_step - (steps - lost)), "loss_finite": finite}


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--steps", type=int, default=20, help="honest steps per phase")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--abuses", default=",".join(ABUSES), help=f"comma list of {', '.join(ABUSES)}")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    from workbench.local import LocalServer

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({"honest": "honest", "abuser": "abuser"}))
        server = LocalServer(device=str(device.type), store=str(Path(tmp) / "store"), api_key="admin-" + uuid.uuid4().hex,
                             extra_args=["--models", args.model, "--api-keys", str(keys)])
        pid = server.process.pid
        try:
            honest_phase(server.url, args.model, 2, args.seq_len)  # warm up
            for kind in ("alone", *filter(None, args.abuses.split(","))):
                stop = threading.Event()
                abuser = None if kind == "alone" else threading.Thread(
                    target=abuse, args=(kind, server.url, stop, args.model, args.seq_len), daemon=True)
                with PeakRSS(pid) as peak:
                    if abuser is not None:
                        abuser.start()
                        time.sleep(0.5)  # let the abuse get going
                    figures = honest_phase(server.url, args.model, args.steps, args.seq_len)
                    stop.set()
                    if abuser is not None:
                        abuser.join(120)
                if kind == "alone":
                    alone_p50 = figures["p50_ms"]
                emit({"benchmark": "abuse", "abuse": kind, "model": args.model, "steps": args.steps,
                      **figures, "p50_over_alone": figures["p50_ms"] / alone_p50,
                      "server_peak_rss_mb": peak.peak, "machine": machine(device, dtype)})
        finally:
            server.stop(timeout=60)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
