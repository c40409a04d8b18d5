"""The wire on loopback: round-trip latency of a trivial request and payload throughput.

Starts a real `workbench-server` (no model loaded: neither measurement touches the engine)
and prints JSON lines:

- `ping_latency`: p50 / p99 / mean of `ping` round trips, (a) from a bare DEALER socket
  (the protocol alone: encode, TCP loopback, server decode + auth + reply) and (b) through the
  SDK's `Connection` (adds the client's I/O thread and the future hand-off).
- `payload_throughput`: a forward_backward-sized datum of `--payload-mb` MiB (tokens, target
  tokens and weights arrays, 4 bytes per element each) sent as a `forward` to a run id that
  does not exist. The server receives every byte, decodes the header and maps the arrays
  (zero-copy), queues it, and the next cycle answers "not found" without running the model.
  Time = send until that reply; GB/s = payload bytes / time (1 GB = 1e9 bytes). So it
  measures the wire plus one scheduler cycle, not model compute. (`forward`, because a
  `forward_backward` would also wait out the scheduler's 20 ms gather window for its
  optim_step, a scheduling policy rather than the wire.)
- `zmq_baseline`: the same bytes through a bare DEALER -> ROUTER echo in this process, no
  workbench code at all: the ceiling this machine's loopback TCP + libzmq allow.

Targets (issue 4): ping p50 <= 0.5 ms; >= 1 GB/s.

    python benchmarks/bench_wire.py
    python benchmarks/bench_wire.py --pings 5000 --payload-mb 64 --payload-repeats 10
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

import numpy as np
import torch
import zmq

from _machine import emit, machine

from workbench import wire
from workbench.connection import Connection
from workbench.local import LocalServer


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": len(ms)}


def raw_round_trip(sock: zmq.Socket, frames: list) -> tuple[float, dict]:
    start = time.perf_counter()
    sock.send_multipart(frames, copy=False)
    reply = sock.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    return elapsed, wire.decode(reply)


def bench_ping(server: LocalServer, n: int) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.url)
    times = []
    for i in range(n + 100):  # the first 100 warm up the connection
        frames = wire.encode(wire.request(f"p{i}", "ping", server.api_key, {}))
        elapsed, reply = raw_round_trip(sock, frames)
        assert reply["ok"], reply
        if i >= 100:
            times.append(elapsed)
    sock.close(0)
    emit({"bench": "ping_latency", "path": "raw DEALER", **percentiles(times)})

    connection = Connection(server.url, server.api_key)
    times = []
    for i in range(n + 100):
        start = time.perf_counter()
        connection.call("ping", {}).result(10)
        if i >= 100:
            times.append(time.perf_counter() - start)
    connection.close()
    emit({"bench": "ping_latency", "path": "SDK Connection", **percentiles(times)})


def bench_payload(server: LocalServer, megabytes: float, repeats: int) -> None:
    n = int(megabytes * 2**20) // 12  # three 4-byte arrays per token
    datum = {"tokens": np.ones(n, np.int32), "loss_fn_inputs": {
        "target_tokens": np.ones(n, np.int32), "weights": np.ones(n, np.float32)}}
    payload = 12 * n
    args = {"model_id": "run-000000000000", "data": [datum], "loss_fn": "cross_entropy"}
    assert sum(a.nbytes for a in (datum["tokens"], *datum["loss_fn_inputs"].values())) == 12 * n
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.url)
    times = []
    for i in range(repeats + 1):
        frames = wire.encode(wire.request(uuid.uuid4().hex, "forward", server.api_key, args))
        elapsed, reply = raw_round_trip(sock, frames)
        assert reply["error"]["type"] == "NotFoundError", reply  # delivered, decoded, answered
        if i:
            times.append(elapsed)
    sock.close(0)
    best, median = min(times), float(np.median(times))
    emit({"bench": "payload_throughput", "payload_bytes": payload, "repeats": repeats,
          "median_s": median, "GB_per_s_median": payload / median / 1e9, "GB_per_s_best": payload / best / 1e9,
          "measures": "raw DEALER send of a forward request -> server decode + one "
                      "cycle -> NotFoundError reply; no model compute"})


def bench_zmq_baseline(megabytes: float, repeats: int) -> None:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = np.ones(int(megabytes * 2**20) // 4, np.float32)

    def echo() -> None:
        for _ in range(repeats + 1):
            identity, *_ = router.recv_multipart(copy=False)
            router.send_multipart([identity, b"ok"])

    thread = threading.Thread(target=echo)
    thread.start()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        dealer.send_multipart([b"header", memoryview(payload).cast("B")], copy=False)
        dealer.recv_multipart()
        if i:
            times.append(time.perf_counter() - start)
    thread.join()
    dealer.close(0)
    router.close(0)
    median = float(np.median(times))
    emit({"bench": "zmq_baseline", "payload_bytes": payload.nbytes, "repeats": repeats,
          "median_s": median, "GB_per_s_median": payload.nbytes / median / 1e9,
          "measures": "bare libzmq DEALER -> ROUTER echo on loopback TCP, same process"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--payload-mb", type=float, default=64.0)
    parser.add_argument("--payload-repeats", type=int, default=8)
    args = parser.parse_args()
    server = LocalServer(device="cpu")
    try:
        emit({"bench": "machine", "machine": machine(torch.device("cpu"), torch.float32)})
        bench_ping(server, args.pings)
        bench_payload(server, args.payload_mb, args.payload_repeats)
        bench_zmq_baseline(args.payload_mb, args.payload_repeats)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
