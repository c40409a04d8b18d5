"""The GPU check: the engine's CUDA path verified and measured in one command (issue 20).

    bash benchmarks/gpu_check.sh RESULTS_DIR          # on a CUDA machine, at most 8 minutes
    bash benchmarks/gpu_check.sh --tiny RESULTS_DIR   # anywhere, tiny model, under 2 minutes

(gpu_check.sh calls `python benchmarks/gpu_check.py [--tiny] [--budget S] OUT`.) Every step
runs in its own process under a time box, its JSON lines land in OUT/results.jsonl tagged
with the step, its output in OUT/logs/<step>.log; a failed or timed-out step is recorded
and the next one runs; OUT/summary.txt is written at the end (also printed). Exit status 0
when every step passed (or was skipped for a reason, such as pytest not being installed).

Steps, most important first (time boxes on CUDA; the whole run is capped by --budget):

  env               versions, GPU, and the version-sensitive calls on the engine's path
                    (transformers 5.17 on the GPU machine vs 5.2x here), no pyzmq
  exactness         the engine in bf16 against PEFT, on the device (below)
  train_throughput  tokens/s, MFU (4N FLOPs/token) and peak memory, qwen3-1.7b, 16 x 2048
  multitenant       K = 1, 4, 8, 16 adapters on qwen3-0.6b: engine vs serial PEFT steps vs
                    one batched PEFT step of the same tokens (the packing ceiling)
  decode            64 prompts x 128 new tokens over 8 adapters (qwen3-0.6b) vs HF generate
                    + PEFT mixed batch, and vs the base model alone (ours and HF's)
  resident          rank-32 adapters (weights + AdamW state) resident on qwen3-1.7b beside
                    the working memory of a full training micro-batch, before offload
  cuda_tests        the tests that skip without CUDA (`skipif(not torch.cuda.is_available())`
                    in tests/), under pytest when it is installed

Exactness (`--step exactness`): tiny-qwen3 loaded in bf16 on the device (the engine's CUDA
default: flex attention with a document mask, grouped GEMM LoRA, foreach AdamW on fp32
masters), three adapters of different ranks, alphas and layer groups with random B, packed
several sequences to a row over several micro-batches. The reference is plain PEFT on an
fp32 copy of the same bf16-rounded base weights, computed in fp32 without TF32, one sequence
and one adapter at a time: the exact function the engine approximates. Checks: packed
forward_backward (logprobs, losses, gradients); grouped GEMM vs the loop; flex vs the sdpa
mask with gradients (CUDA; forward only on a CPU, whose torch has no flex backward); AdamW
steps vs torch.optim.AdamW on the engine's own gradients; a 5-step training curve vs PEFT +
torch AdamW; sampled logprobs vs forward logprobs (engine and PEFT); export loaded with
`PeftModel.from_pretrained` on the bf16 base. PEFT's own bf16 error against the same
reference is measured beside the engine's, as a yardstick.

Tolerances (the reasoning of tests/test_engine_bf16.py, which measures the same on CPU):
  * bf16 keeps 8 significant bits, unit roundoff u = 2^-8 ~ 0.0039. Every layer rounds its
    activations to bf16, so a logprob of magnitude ~8 (log of tiny-qwen3's 4096-token vocab)
    is off by order u * |lp| ~ 0.03 nats. Bounds: LP_MAX = 0.05 nats per token, LP_MEAN =
    0.02 nats on average (bf16 vs fp32 measured 0.023 max, 0.008 mean on CPU). A lost LoRA
    scaling or a token routed to the wrong adapter moves logprobs by far more (mutations of
    the CPU test fail it).
  * A loss is a weighted sum of logprobs, so it is off by at most LP_MAX * sum|w|.
  * Gradients are sums of many rounded products: compared by direction, cosine > 0.99 per
    tensor, and by relative norm error < 0.15 (what cosine 0.99 allows at equal norms;
    measured worst 0.997 and 0.08 on CPU).
  * Two bf16 paths of the engine (grouped vs loop, flex vs sdpa mask) each meet the same
    bounds against each other.
  * AdamW runs on fp32 masters: given the same gradients the engine's step equals
    torch.optim.AdamW (+ clip_grad_norm_) up to fp32 rounding of the update: weights within
    ADAM_ATOL = 1e-6 after 3 steps (they are O(0.1); the update is lr * O(1) with lr 1e-2, so
    rounding is ~1e-9; a wrong bias correction, decoupled decay or clip is >= 1e-4).
  * Training curves follow within 8% per step (bf16 vs fp32 measured within 2.4% on CPU).

Run on its own for a step: `python benchmarks/gpu_check.py --step exactness [--device cpu]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QWEN = "tiny-qwen3"

LP_MAX, LP_MEAN = 0.05, 0.02  # nats; see the module docstring
GRAD_COS_MIN, GRAD_REL_MAX = 0.99, 0.15
ADAM_ATOL = 1e-6
CURVE_RTOL = 0.08

# ------------------------------------------------------------------------ the plan

# name -> (time box on CUDA in s, time box with --tiny in s, argv on CUDA, argv with --tiny)
STEPS: dict[str, tuple[int, int, list[str], list[str]]] = {
    "env": (45, 30, ["gpu_check.py", "--step", "env"], ["gpu_check.py", "--step", "env"]),
    "exactness": (150, 60, ["gpu_check.py", "--step", "exactness"], ["gpu_check.py", "--step", "exactness"]),
    "train_throughput": (
        90, 30,
        ["bench_train_throughput.py", "--model", "qwen3-1.7b", "--adapters", "2", "--seqs", "8",
         "--tokens", "2048", "--rank", "32", "--repeats", "3"],
        ["bench_train_throughput.py", "--adapters", "2", "--seqs", "2", "--tokens", "16", "--repeats", "1"],
    ),
    "multitenant": (
        110, 30,
        ["bench_multitenant.py", "--model", "qwen3-0.6b", "--ks", "1,4,8,16", "--seqs", "4", "--tokens", "128",
         "--rank", "16", "--repeats", "3"],
        ["bench_multitenant.py", "--ks", "1,4", "--seqs", "1", "--tokens", "8", "--rank", "4", "--repeats", "1"],
    ),
    "decode": (
        100, 30,
        ["bench_decode.py", "--model", "qwen3-0.6b", "--prompts", "64", "--new-tokens", "128", "--adapters", "8",
         "--rank", "16", "--repeats", "1"],
        ["bench_decode.py", "--prompts", "4", "--new-tokens", "4", "--adapters", "2", "--rank", "4", "--repeats", "1"],
    ),
    "resident": (
        70, 30,
        ["gpu_check.py", "--step", "resident", "--model", "qwen3-1.7b", "--rank", "32"],
        ["gpu_check.py", "--step", "resident", "--model", QWEN, "--rank", "32", "--max-adapters", "3"],
    ),
    "cuda_tests": (75, 40, ["gpu_check.py", "--step", "cuda_tests"], ["gpu_check.py", "--step", "cuda_tests"]),
}
MIN_STEP_S = 20  # a step is skipped when less than this is left of the budget
HIDE_ZMQ_ENV = "WORKBENCH_BENCH_HIDE_ZMQ"  # as in _machine.py (not imported here: no torch in the driver)


def run_all(out: Path, tiny: bool, budget: float, only: list[str] | None) -> int:
    """Run the steps in order, each in its own process group under its time box; write
    results.jsonl, logs/ and summary.txt into `out`. Returns the exit status."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    results = out / "results.jsonl"
    results.write_text("")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{HIDE_ZMQ_ENV: "1"})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on the hub
    if tiny:
        env.setdefault("OMP_NUM_THREADS", "1")  # CI runs it beside other torch processes
    statuses: list[dict[str, Any]] = []
    records: dict[str, list[dict[str, Any]]] = {}
    for name, (box_gpu, box_tiny, argv_gpu, argv_tiny) in STEPS.items():
        if only and name not in only:
            continue
        left = budget - (time.monotonic() - start)
        box = min(box_tiny if tiny else box_gpu, left)
        argv = list(argv_tiny if tiny else argv_gpu)
        argv += ["--device", "auto" if tiny else "cuda"]
        cmd = [sys.executable, str(HERE / argv[0]), *argv[1:]]
        status: dict[str, Any] = {"step": name, "bench": "step", "cmd": " ".join(["python", f"benchmarks/{argv[0]}", *argv[1:]]),
                                  "time_box_s": round(box, 1)}
        if left < MIN_STEP_S:
            status.update(status="skipped", reason=f"out of time ({left:.0f} s of the {budget:.0f} s budget left)",
                          seconds=0.0)
            step_records: list[dict[str, Any]] = []
        else:
            status, step_records = run_step(name, cmd, box, env, out, status)
        records[name] = step_records
        statuses.append(status)
        with results.open("a") as f:
            for rec in step_records:
                f.write(json.dumps({"step": name, **rec}) + "\n")
            f.write(json.dumps(status) + "\n")
        print(f"[gpu_check] {name}: {status['status']} in {status.get('seconds', 0):.1f} s"
              + (f" ({status['reason']})" if status.get("reason") else ""), file=sys.stderr, flush=True)
    wall = time.monotonic() - start
    text = summary_text(statuses, records, tiny, wall, budget)
    (out / "summary.txt").write_text(text)
    failed = [s["step"] for s in statuses if s["status"] not in ("ok", "skipped")]
    with results.open("a") as f:
        f.write(json.dumps({"step": "summary", "bench": "summary", "tiny": tiny, "wall_s": round(wall, 1),
                            "budget_s": budget, "failed": failed,
                            "statuses": {s["step"]: s["status"] for s in statuses}}) + "\n")
    print(text, flush=True)
    return 1 if failed else 0


def run_step(name: str, cmd: list[str], box: float, env: dict, out: Path,
             status: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    log_path = out / "logs" / f"{name}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log, tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=stdout, stderr=log, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=box)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _kill_group(proc)
        stdout.seek(0)
        lines = stdout.read().splitlines()
    seconds = time.monotonic() - t0
    step_records, other = [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        (step_records if isinstance(rec, dict) else other).append(rec)
    if other:
        with open(log_path, "a") as log:
            log.write("\n# stdout lines that were not JSON records:\n" + "\n".join(map(str, other)) + "\n")
    failed_checks = [r.get("check") or r.get("test") or r.get("bench") for r in step_records if r.get("ok") is False]
    skipped = [r for r in step_records if r.get("status") == "skipped"]
    if timed_out:
        state, reason = "timeout", f"killed after its {box:.0f} s time box"
    elif rc != 0:
        state, reason = "failed", f"exit status {rc}"
    elif failed_checks:
        state, reason = "failed", "failed: " + ", ".join(map(str, failed_checks))
    elif not step_records:
        state, reason = "failed", "printed no JSON record"
    elif skipped and len(skipped) == len(step_records):
        state, reason = "skipped", skipped[0].get("reason", "")
    else:
        state, reason = "ok", ""
    status.update(status=state, seconds=round(seconds, 1), rc=rc, records=len(step_records))
    if reason:
        status["reason"] = reason
    if state in ("failed", "timeout"):
        status["log_tail"] = _tail(log_path, 1500)
    return status, step_records


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM the step's process group (it started its own session), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ------------------------------------------------------------------------ the summary


def _fmt(value: Any, spec: str = "", none: str = "n/a") -> str:
    if value is None:
        return none
    return format(value, spec)


def summary_text(statuses: list[dict], records: dict[str, list[dict]], tiny: bool, wall: float,
                 budget: float) -> str:
    machine = next((r["machine"] for recs in records.values() for r in recs if isinstance(r.get("machine"), dict)), {})
    env = next(iter(records.get("env", [])), {})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"GPU check{' (--tiny)' if tiny else ''}, {stamp}, wall {wall:.0f} s of a {budget:.0f} s budget",
        f"device: {machine.get('gpu') or machine.get('device', '?')} ({machine.get('device', '?')}, "
        f"{machine.get('dtype', '?')}), host {machine.get('hostname', '?')}",
        f"torch {env.get('torch') or machine.get('torch', '?')}, transformers "
        f"{env.get('transformers') or machine.get('transformers', '?')}, peft {env.get('peft') or machine.get('peft', '?')}",
        "",
    ]
    lines = []
    for st in statuses:
        figs = _figures(st["step"], records.get(st["step"], []))
        reason = f" [{st['reason']}]" if st.get("reason") else ""
        last = [ln for ln in st.get("log_tail", "").splitlines() if ln.strip()]
        if last:
            reason += f" last log line: {last[-1].strip()[:200]}"
        lines.append(f"{st['step']:<17} {st['status']:<8} {st.get('seconds', 0):>6.1f} s  {figs}{reason}")
    failed = [s["step"] for s in statuses if s["status"] not in ("ok", "skipped")]
    tail = ["", "RESULT: " + (f"FAILED: {', '.join(failed)} (see logs/<step>.log)" if failed
                              else f"all {len(statuses)} steps ok or skipped")]
    return "\n".join(head + lines + tail) + "\n"


def _peaks(*named: tuple[str, Any]) -> str:
    """', peak GB a 1.2 / b 3.4' for the figures that exist (none off CUDA)."""
    known = [(n, v) for n, v in named if v is not None]
    return (", peak GB " + " / ".join(f"{n} {v:.1f}" for n, v in known)) if known else ""


def _figures(step: str, recs: list[dict]) -> str:
    try:
        return _figures_of(step, recs)
    except Exception as exc:  # the summary must never fail
        return f"(no figures: {exc!r})"


def _figures_of(step: str, recs: list[dict]) -> str:
    if not recs:
        return ""
    if step == "env":
        r = recs[0]
        bad = [c for c, v in r.get("checks", {}).items() if not v.get("ok")]
        zmq = "pyzmq absent" if not r.get("zmq_installed") else "pyzmq installed (hidden)"
        return f"{zmq}; {len(r.get('checks', {})) - len(bad)}/{len(r.get('checks', {}))} API checks ok" + (
            f", missing: {', '.join(bad)}" if bad else "")
    if step == "exactness":
        checks = [r for r in recs if "check" in r]
        ok = [r for r in checks if r.get("ok")]
        worst = max((r.get("measured", {}).get("lp_max", 0.0) for r in checks), default=0.0)
        text = f"{len(ok)}/{len(checks)} checks pass, worst |dlogprob| {worst:.4f} nats (bound {LP_MAX})"
        fb = next((r["measured"] for r in checks if r["check"] == "forward_backward_vs_peft" and "measured" in r), None)
        if fb:
            yard = fb["peft_bf16_yardstick"]
            text += (f"; vs fp32 PEFT: engine {fb['lp_max']:.4f} / grad cos {fb['grad_cos_min']:.4f},"
                     f" PEFT bf16 {yard['lp_max']:.4f} / {yard['grad_cos_min']:.4f}")
        return text
    if step == "train_throughput":
        r = recs[0]
        return (f"{r['model']} {r['seqs']}x{r['tokens_per_seq']}: {r['tokens_per_s']:,.0f} tok/s, "
                f"MFU {_fmt(r.get('mfu'), '.3f')}" + _peaks(("peak", r.get("peak_gb"))))
    if step == "multitenant":
        parts = [f"K={r['adapters']}: {r['speedup']:.2f}x serial PEFT, {_fmt(r.get('fraction_of_ceiling'), '.2f')}"
                 f" of ceiling" + _peaks(("engine", r.get("engine_peak_gb")), ("serial", r.get("peft_serial_peak_gb")),
                                         ("batched", r.get("peft_batched_peak_gb")))
                 for r in recs if "speedup" in r]
        return f"{recs[0]['model']}: " + "; ".join(parts)
    if step == "decode":
        r = recs[0]
        return (f"{r['model']} {r['prompts']}x{r['new_tokens']} over {r['adapters']} adapters: "
                f"{r['ours_tokens_per_s']:,.0f} tok/s = {r['speedup_vs_hf_peft']:.2f}x HF+PEFT, "
                f"{r['multi_lora_overhead'] * 100:+.0f}% vs our base-only, "
                f"{_fmt(r.get('speedup_vs_hf_base'), '.2f')}x HF base-only"
                + _peaks(("ours", r.get("ours_peak_gb")), ("HF", r.get("hf_peft_peak_gb"))))
    if step == "resident":
        r = recs[0]
        return (f"rank {r['rank']} on {r['model']}: {_fmt(r.get('resident_adapters'))} adapters "
                f"({r.get('method', '?')}), {r['adapter_mb']:.1f} MB each, working reserve "
                f"{_fmt(r.get('work_gb'), '.1f')} GB")
    if step == "cuda_tests":
        r = recs[-1]
        if r.get("status") == "skipped":
            return ""
        return f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped"
    return ""


# ------------------------------------------------------------------------ step: env


def step_env(args) -> None:
    """Versions, the device, and whether each version-sensitive call the engine makes exists
    in the installed torch / transformers / peft (one record; ok False names what is missing)."""
    import importlib.util
    import inspect

    import _machine  # hides pyzmq first, as on the GPU machine

    import torch

    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, fn: Callable[[], Any], required: bool = True) -> None:
        try:
            value = fn()
            checks[name] = {"ok": bool(value) or not required, "value": value if isinstance(value, (bool, int, float, str)) else str(value)}
        except Exception as exc:
            checks[name] = {"ok": not required, "error": f"{type(exc).__name__}: {exc}"[:300]}

    device = _machine.pick_device(args.device)
    check("torch.nn.attention.flex_attention", lambda: importlib.util.find_spec("torch.nn.attention.flex_attention") is not None)
    check("torch._grouped_mm", lambda: hasattr(torch, "_grouped_mm"))
    check("adam(decoupled_weight_decay=)", lambda: "decoupled_weight_decay" in inspect.signature(
        __import__("torch.optim.adam", fromlist=["adam"]).adam).parameters)
    check("transformers.AttentionInterface", lambda: __import__("transformers").AttentionInterface is not None)

    def engine_import():
        import server.engine.engine  # noqa: F401

        if "workbench.connection" not in sys.modules:
            return True
        return "imports workbench.connection (ZeroMQ), which the GPU machine does not have"
    check("server.engine imports", engine_import)

    def tiny_model_calls():
        from transformers import DynamicCache

        from server.engine.sampler import _cache_argument
        from server.tiny import build_tiny_model

        model = build_tiny_model(QWEN)
        params = inspect.signature(model.forward).parameters
        missing = [p for p in ("logits_to_keep", "position_ids") if p not in params]
        if missing:
            raise RuntimeError(f"{type(model).__name__}.forward lacks {missing}")
        if not hasattr(model.config, "_attn_implementation_internal"):
            raise RuntimeError("config has no _attn_implementation_internal (attention.attention_implementation)")
        if not hasattr(DynamicCache, "batch_select_indices"):
            raise RuntimeError("DynamicCache.batch_select_indices is gone (sampler compaction)")
        return f"kv cache argument {_cache_argument(model)!r}"
    check("transformers calls (sampler, attention)", tiny_model_calls)
    check("pytest", lambda: importlib.util.find_spec("pytest") is not None or "not installed", required=False)
    record: dict[str, Any] = {
        "bench": "env", "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": _machine.package_version("transformers"), "peft": _machine.package_version("peft"),
        "python": sys.version.split()[0], "zmq_installed": _zmq_really_installed(),
        "zmq_hidden": _machine.ZMQ_HIDDEN, "checks": checks,
        "ok": all(c["ok"] for c in checks.values()), "machine": _machine.machine(device, _machine.default_dtype(device)),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        record.update(gpu_total_gb=round(total / _machine.GB, 1), gpu_free_gb=round(free / _machine.GB, 1),
                      capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    print(json.dumps(record), flush=True)


def _zmq_really_installed() -> bool:
    """Whether pyzmq is on the path, looking past the hiding finder."""
    from importlib.machinery import PathFinder

    return PathFinder.find_spec("zmq") is not None


# ------------------------------------------------------------------------ step: exactness


def step_exactness(args) -> None:
    import _machine  # noqa: F401  (hides pyzmq, sys.path)

    import numpy as np
    import torch

    from server.engine.engine import AdapterConfig, Engine, EngineDatum, ForwardItem
    from server.engine.models import load_base_model

    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # PEFT, on lm_head adapters
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")  # CPU only
    device = _machine.pick_device(args.device)
    torch.set_float32_matmul_precision("highest")  # the fp32 reference without TF32
    engine = Engine(device=str(device))  # CUDA defaults: flex attention, grouped LoRA
    engine.register_model(load_base_model(QWEN, engine.device, torch.bfloat16))
    defaults = {"attention": engine.attention, "lora_impl": engine.lora_impl}
    # Several sequences share a row; several micro-batches per pass.
    engine.row_length, engine.token_budget = 64, 256
    ctx = Exactness(engine, device, np, torch)
    print(json.dumps({"bench": "exactness_setup", "model": QWEN, "engine_defaults": defaults,
                      "row_length": 64, "token_budget": 256,
                      "machine": _machine.machine(device, torch.bfloat16)}), flush=True)

    rng = np.random.default_rng(0)

    def data(lengths, low=-1.0):
        """Sequences of random tokens with random weights in [low, 1] (signed by default: the
        loss is linear in them, and negative weights must flow through unchanged)."""
        out = []
        for n in lengths:
            tokens = rng.integers(0, 4000, n + 1)
            out.append(EngineDatum(tokens[:-1].copy(), {"target_tokens": tokens[1:].copy(),
                                                         "weights": rng.uniform(low, 1, n).astype(np.float32)}))
        return out

    adapters = [
        ctx.adapter("x-a", AdapterConfig(rank=8, alpha=24.0, seed=1)),
        ctx.adapter("x-b", AdapterConfig(rank=4, alpha=4.0, seed=2, train_mlp=False)),
        ctx.adapter("x-c", AdapterConfig(rank=16, alpha=16.0, seed=3, train_attn=False)),
    ]
    items = [ForwardItem(adapters[0], data((37, 5, 20, 61))), ForwardItem(adapters[1], data((64, 11))),
             ForwardItem(adapters[2], data((3, 50, 9, 18)))]
    can_flex_backward = device.type == "cuda"

    ctx.run("forward_backward_vs_peft", lambda: ctx.forward_backward_vs_peft(items))
    ctx.run("grouped_vs_loop", lambda: ctx.paths_agree(items, "lora_impl", ("grouped", "loop"), backward=True))
    ctx.run("flex_vs_sdpa_mask" + ("" if can_flex_backward else "_forward_only"),
            lambda: ctx.paths_agree(items, "attention", ("flex", "sdpa_mask"), backward=can_flex_backward))
    ctx.run("adamw_vs_torch", lambda: ctx.adamw_vs_torch(adapters[0], items[0]))
    ctx.run("training_curve_vs_peft", lambda: ctx.curve_vs_peft(
        ctx.adapter("x-d", AdapterConfig(rank=8, alpha=16.0, seed=4)), data((16, 12, 30), low=0.0)))
    ctx.run("sampling_vs_forward_and_peft", lambda: ctx.sampling(adapters[:2]))
    ctx.run("export_loads_in_peft", lambda: ctx.export_to_peft(adapters[2], data((7, 15, 40))))


class Exactness:
    """The exactness checks of one engine (bf16 tiny-qwen3 on `device`); each emits a record."""

    def __init__(self, engine, device, np, torch):
        self.engine, self.device, self.np, self.torch = engine, device, np, torch

    # ---- helpers

    def run(self, name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            measured = fn()
            ok = measured.pop("ok")
            tolerance = measured.pop("tolerance", None)
            record = {"bench": "exactness", "check": name, "ok": bool(ok), "measured": measured, "tolerance": tolerance}
        except Exception as exc:
            record = {"bench": "exactness", "check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
        record["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(record), flush=True)
        if not record["ok"]:
            print(f"check {name} failed: {json.dumps(record)[:3000]}", file=sys.stderr, flush=True)

    def adapter(self, aid, config, b_std=0.05):
        """An engine adapter with random (non-zero) B, so every factor gets a gradient."""
        torch = self.torch
        ad = self.engine.create_adapter(aid, QWEN, config)
        g = torch.Generator().manual_seed(config.seed + 500)
        with torch.no_grad():
            for pair in ad.pairs.values():
                pair.lora_B.copy_(torch.randn(pair.lora_B.shape, generator=g) * b_std)
        return aid

    def grads(self, aid):
        return [p.grad.detach().float().clone() for p in self.engine.adapters[aid].parameters()]

    def zero(self, aids):
        for aid in aids:
            self.engine.adapters[aid].optimizer.zero_grad()

    def peft(self, aid, dtype):
        """Plain PEFT with the engine adapter's current weights on a fresh tiny-qwen3 whose
        weights are the engine's bf16 ones (in `dtype`), on the device, eval mode."""
        import peft

        from server.engine.lora import GROUP_OF_MODULE
        from server.tiny import build_tiny_model

        torch = self.torch
        model = build_tiny_model(QWEN, dtype=torch.bfloat16, device=str(self.device)).to(dtype)
        cfg = self.engine.adapters[aid].config
        targets = [m for m, g in GROUP_OF_MODULE.items() if g in cfg.groups()]
        pm = peft.get_peft_model(model, peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets,
                                                        lora_dropout=0.0, bias="none"))
        tensors, _ = self.engine.export_adapter(aid)
        result = peft.set_peft_model_state_dict(pm, tensors)
        if result.unexpected_keys:
            raise AssertionError(f"PEFT did not take {sorted(result.unexpected_keys)[:3]}")
        pm.eval()
        return pm

    def peft_factors(self, pm, aid):
        out = []
        for name in self.engine.adapters[aid].pairs:
            module = pm.base_model.model.get_submodule(name)
            out += [module.lora_A["default"].weight, module.lora_B["default"].weight]
        return out

    def peft_logprobs(self, pm, tokens, targets):
        torch = self.torch
        ids = torch.as_tensor(self.np.asarray(tokens), dtype=torch.long, device=self.device)[None]
        logits = pm(input_ids=ids, use_cache=False).logits[0].float()
        tgt = torch.as_tensor(self.np.asarray(targets), dtype=torch.long, device=self.device)
        return torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]

    def lp_stats(self, got, want) -> dict:
        np = self.np
        diff = np.abs(np.concatenate([np.asarray(a, np.float64) for a in got])
                      - np.concatenate([np.asarray(b, np.float64) for b in want]))
        finite = bool(np.isfinite(diff).all())
        return {"lp_max": float(diff.max()) if finite else float("inf"), "lp_mean": float(diff.mean()) if finite else float("inf")}

    def grad_stats(self, got, want) -> dict:
        torch = self.torch
        cos, rel = [], []
        for a, b in zip(got, want):
            a, b = a.double().flatten(), b.double().flatten().to(a.device)
            if float(b.norm()) == 0:
                raise AssertionError("a zero reference gradient (the check would be weak)")
            cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            rel.append(float((a - b).norm() / b.norm()))
        if len(got) != len(want) or not got:
            raise AssertionError(f"{len(got)} gradients vs {len(want)}")
        return {"grad_cos_min": min(cos), "grad_rel_max": max(rel)}

    @staticmethod
    def lp_ok(m: dict) -> bool:
        return m["lp_max"] <= LP_MAX and m["lp_mean"] <= LP_MEAN

    @staticmethod
    def grad_ok(m: dict) -> bool:
        return m["grad_cos_min"] > GRAD_COS_MIN and m["grad_rel_max"] < GRAD_REL_MAX

    def forward(self, items, backward):
        results = self.engine.forward(items, backward=backward)
        for r in results:
            if not hasattr(r, "logprobs"):
                raise AssertionError(f"the engine refused an item: {r!r}")
        return results

    # ---- the checks

    def forward_backward_vs_peft(self, items) -> dict:
        """One packed forward_backward of three adapters vs PEFT fp32 (and PEFT bf16, the
        yardstick) one sequence at a time."""
        torch = self.torch
        aids = [it.adapter_id for it in items]
        self.zero(aids)
        results = self.forward(items, backward=True)
        got_lp, got_grads, want_lp, want_grads = [], [], [], []
        yard_lp, yard_grads = [], []
        loss_err = loss_ratio = 0.0
        for item, res in zip(items, results):
            got_grads += self.grads(item.adapter_id)
            for dtype, lps, grads in ((torch.float32, want_lp, want_grads), (torch.bfloat16, yard_lp, yard_grads)):
                pm = self.peft(item.adapter_id, dtype)
                total = 0.0
                for d in item.data:
                    lp = self.peft_logprobs(pm, d.tokens, d.inputs["target_tokens"])
                    lps.append(lp.detach().cpu().numpy())
                    total = total - (lp * torch.as_tensor(d.inputs["weights"], device=self.device)).sum()
                total.backward()
                grads += [p.grad.detach().float().clone() for p in self.peft_factors(pm, item.adapter_id)]
                if dtype == torch.float32:
                    err = abs(res.metrics["loss:sum"] - float(total.detach()))
                    w_abs = sum(float(self.np.abs(d.inputs["weights"]).sum()) for d in item.data)
                    loss_err, loss_ratio = max(loss_err, err), max(loss_ratio, err / (w_abs * LP_MAX))
                del pm
            got_lp += list(res.logprobs)
        self.zero(aids)
        m = {**self.lp_stats(got_lp, want_lp), **self.grad_stats(got_grads, want_grads)}
        yard = {**self.lp_stats(yard_lp, want_lp), **self.grad_stats(yard_grads, want_grads)}
        m.update(loss_abs_err_max=loss_err, loss_err_over_bound=loss_ratio,
                 peft_bf16_yardstick=yard, tokens=int(sum(len(x) for x in got_lp)))
        m["ok"] = self.lp_ok(m) and self.grad_ok(m) and loss_ratio <= 1.0
        m["tolerance"] = {"lp_max": LP_MAX, "lp_mean": LP_MEAN, "grad_cos_min": GRAD_COS_MIN,
                          "grad_rel_max": GRAD_REL_MAX, "loss_err": "LP_MAX * sum|w|"}
        return m

    def paths_agree(self, items, setting: str, values: tuple[str, str], backward: bool) -> dict:
        """The same pass through two of the engine's paths (lora_impl or attention)."""
        engine = self.engine
        aids = [it.adapter_id for it in items]
        saved = (engine.lora_impl, engine.attention)
        outcomes = []
        try:
            for value in values:
                if setting == "lora_impl":
                    engine.set_lora_impl(value)
                else:
                    engine.attention = value
                self.zero(aids)
                res = self.forward(items, backward=backward)
                grads = [g for aid in aids for g in self.grads(aid)] if backward else []
                outcomes.append(([lp for r in res for lp in r.logprobs], grads))
        finally:
            engine.set_lora_impl(saved[0])
            engine.attention = saved[1]
            self.zero(aids)
        (lp_a, g_a), (lp_b, g_b) = outcomes
        m = self.lp_stats(lp_a, lp_b)
        ok = self.lp_ok(m)
        if backward:
            m.update(self.grad_stats(g_a, g_b))
            ok = ok and self.grad_ok(m)
        m.update(ok=ok, compared=list(values), backward=backward,
                 tolerance={"lp_max": LP_MAX, "lp_mean": LP_MEAN, "grad_cos_min": GRAD_COS_MIN, "grad_rel_max": GRAD_REL_MAX})
        return m

    def adamw_vs_torch(self, aid, item) -> dict:
        """3 engine optim_steps (clipping active, weight decay) vs torch.optim.AdamW +
        clip_grad_norm_ stepping copies of the same weights with the engine's gradients."""
        torch = self.torch
        engine = self.engine
        ad = engine.adapters[aid]
        params = ad.parameters()
        start = [p.detach().clone() for p in params]
        ref = [p.detach().clone().requires_grad_(True) for p in params]
        self.zero([aid])
        self.forward([item], backward=True)
        norm0 = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        clip = 0.5 * norm0
        adam = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=clip)
        opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        diffs, norm_rel = [], []
        for step in range(3):
            if step:
                self.forward([item], backward=True)
            for r, p in zip(ref, params):
                r.grad = p.grad.detach().clone()
            ref_norm = float(torch.nn.utils.clip_grad_norm_(ref, clip))
            opt.step()
            metrics = engine.optim_step(aid, adam)
            norm_rel.append(abs(metrics["grad_norm:mean"] - ref_norm) / ref_norm)
            diffs.append(max(float((p.detach() - r.detach()).abs().max()) for p, r in zip(params, ref)))
            for r, p in zip(ref, params):  # carry on from the engine's weights (the moments stay separate)
                with torch.no_grad():
                    r.copy_(p.detach())
        moments = 0.0
        state = ad.optimizer.optimizer.state
        for p, r in zip(params, ref):
            for key in ("exp_avg", "exp_avg_sq"):
                moments = max(moments, float((state[p][key] - opt.state[r][key]).abs().max()))
        m = {"weight_abs_diff_max": max(diffs), "moment_abs_diff_max": moments, "grad_norm_rel_err_max": max(norm_rel),
             "clip": clip, "first_grad_norm": norm0, "device_params": str(params[0].device),
             "weights_moved_max": max(float((p.detach() - p0).abs().max()) for p, p0 in zip(params, start))}
        m["ok"] = max(diffs) <= ADAM_ATOL and moments <= ADAM_ATOL and max(norm_rel) <= 1e-5
        m["tolerance"] = {"weight_abs_diff_max": ADAM_ATOL, "moment_abs_diff_max": ADAM_ATOL, "grad_norm_rel_err_max": 1e-5}
        return m

    def curve_vs_peft(self, aid, data) -> dict:
        """5 training steps of the bf16 engine vs PEFT fp32 + torch AdamW from the same start."""
        from server.engine.engine import ForwardItem

        torch = self.torch
        pm = self.peft(aid, torch.float32)
        params = self.peft_factors(pm, aid)
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        adam = dict(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
        ours, theirs = [], []
        for _ in range(5):
            ours.append(self.forward([ForwardItem(aid, data)], backward=True)[0].metrics["loss:sum"])
            self.engine.optim_step(aid, adam)
            total = 0.0
            for d in data:
                lp = self.peft_logprobs(pm, d.tokens, d.inputs["target_tokens"])
                total = total - (lp * torch.as_tensor(d.inputs["weights"], device=self.device)).sum()
            theirs.append(float(total.detach()))
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
        w_ours = torch.cat([t.detach().flatten() for t in self.engine.adapters[aid].parameters()])
        w_ref = torch.cat([t.detach().flatten() for t in params]).to(w_ours.device)
        cos = float(torch.nn.functional.cosine_similarity(w_ours.double(), w_ref.double(), dim=0))
        learnt = theirs[-1] < 0.9 * theirs[0]
        return {"ok": max(rel) <= CURVE_RTOL and cos > 0.99 and learnt, "engine_losses": ours, "peft_losses": theirs,
                "rel_err_max": max(rel), "weights_cos": cos,
                "tolerance": {"rel_err_max": CURVE_RTOL, "weights_cos": 0.99, "peft_loss_drop": 0.9}}

    def sampling(self, aids) -> dict:
        """Greedy and tempered multi-adapter sampling: each sample's logprobs vs the engine's
        forward on the sampled sequence and vs PEFT fp32; greedy tokens vs PEFT's argmax."""
        from server.engine.sampler import SampleRequest

        np, torch, engine = self.np, self.torch, self.engine
        rng = np.random.default_rng(5)
        prompt = rng.integers(0, 4000, 9).tolist()
        slots = {aid: engine.adapters[aid].slot for aid in aids}
        reqs = [(aids[0], SampleRequest(slots[aids[0]], prompt, 2, 8, temperature=0.0, seed=1)),
                (aids[1], SampleRequest(slots[aids[1]], prompt[:4], 2, 8, temperature=0.8, top_k=100, seed=2)),
                (None, SampleRequest(None, prompt[3:], 1, 8, seed=3))]
        outs = engine.sample(QWEN, [r for _, r in reqs])
        vs_forward, vs_peft, greedy_same, greedy_total = [], [], 0, 0
        for (owner, req), samples in zip(reqs, outs):
            pm = self.peft(owner, torch.float32) if owner is not None else None
            for s in samples:
                if len(s.tokens) != req.max_tokens:
                    raise AssertionError(f"{len(s.tokens)} tokens, asked for {req.max_tokens}")
                seq = np.asarray(req.prompt + s.tokens)
                fwd = engine.prompt_logprobs(QWEN, [(owner, seq)])[0]
                vs_forward.append((s.logprobs, fwd[len(req.prompt):]))
                if pm is not None:
                    with torch.no_grad():
                        lp = self.peft_logprobs(pm, seq[:-1], seq[1:]).cpu().numpy()
                    vs_peft.append((s.logprobs, lp[len(req.prompt) - 1:]))
                    if req.temperature == 0.0:
                        with torch.no_grad():
                            ids = torch.as_tensor(seq[:-1], device=self.device)[None]
                            argmax = pm(input_ids=ids, use_cache=False).logits[0].argmax(-1).cpu().numpy()
                        greedy_same += int((argmax[len(req.prompt) - 1:] == seq[len(req.prompt):]).sum())
                        greedy_total += req.max_tokens
        m_fwd = self.lp_stats([a for a, _ in vs_forward], [b for _, b in vs_forward])
        m_peft = self.lp_stats([a for a, _ in vs_peft], [b for _, b in vs_peft])
        return {"ok": self.lp_ok(m_fwd) and self.lp_ok(m_peft), "vs_engine_forward": m_fwd, "vs_peft_fp32": m_peft,
                "lp_max": max(m_fwd["lp_max"], m_peft["lp_max"]),
                # informational: a bf16 near-tie may pick another token than fp32 does
                "greedy_tokens_equal_peft_argmax": f"{greedy_same}/{greedy_total}",
                "tolerance": {"lp_max": LP_MAX, "lp_mean": LP_MEAN}}

    def export_to_peft(self, aid, data) -> dict:
        """Export, write adapter_model.safetensors + adapter_config.json, load with
        PeftModel.from_pretrained on the bf16 and the fp32 base: same logprobs as the engine."""
        import peft
        from safetensors.torch import save_file

        from server.engine.engine import ForwardItem
        from server.tiny import build_tiny_model

        torch = self.torch
        tensors, config = self.engine.export_adapter(aid)
        mine = self.forward([ForwardItem(aid, data)], backward=False)[0].logprobs
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"))
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(config))
            for dtype in (torch.bfloat16, torch.float32):
                base = build_tiny_model(QWEN, dtype=torch.bfloat16, device=str(self.device)).to(dtype)
                pm = peft.PeftModel.from_pretrained(base, tmp)
                pm.eval()
                loaded = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
                if loaded.keys() != tensors.keys():
                    raise AssertionError(f"PEFT loaded other keys: {sorted(set(loaded) ^ set(tensors))[:4]}")
                same = all(torch.equal(loaded[k].float().cpu(), tensors[k]) for k in tensors)
                with torch.no_grad():
                    theirs = [self.peft_logprobs(pm, d.tokens, d.inputs["target_tokens"]).cpu().numpy() for d in data]
                out[str(dtype).replace("torch.", "")] = {**self.lp_stats(mine, theirs), "tensors_equal": same}
        ok = all(self.lp_ok(v) and v["tensors_equal"] for v in out.values())
        return {"ok": ok, **out, "lp_max": max(v["lp_max"] for v in out.values()),
                "tolerance": {"lp_max": LP_MAX, "lp_mean": LP_MEAN}}


# ------------------------------------------------------------------------ step: resident


def step_resident(args) -> None:
    """How many rank-`--rank` adapters (the engine's default groups, unembed included; fp32
    weights + AdamW moments, as they rest between steps) fit on the device beside the model
    and the working memory of one full training micro-batch (`--token-budget` tokens), i.e.
    what --max-resident-adapters can be before the engine must offload.

    Adapters are created and stepped once each until the free memory would drop below the
    working reserve, `--max-adapters` is reached, or `--seconds` pass (then the rest is
    estimated from the measured size per adapter)."""
    import _machine

    import numpy as np
    import torch

    from server.engine.engine import AdapterConfig, EngineDatum, ForwardItem

    device, dtype = _machine.device_and_dtype(args)
    engine = _machine.engine_with_model(args.model, device, dtype, token_budget=args.token_budget)
    base = engine.bases[args.model]
    rng = np.random.default_rng(0)
    adam = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)

    def datum(n):
        tokens = rng.integers(0, min(base.vocab_size, 4096), n + 1)
        return EngineDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(n, np.float32)})

    created: list[str] = []

    def add(count: int) -> None:
        ids = [f"res-{len(created) + i}" for i in range(count)]
        for aid in ids:
            engine.create_adapter(aid, args.model, AdapterConfig(rank=args.rank, seed=len(created)))
            created.append(aid)
        engine.forward([ForwardItem(aid, [datum(8)]) for aid in ids], backward=True)
        engine.optim_steps([(aid, adam) for aid in ids])

    model_gb = _machine.allocated_gb(device)
    add(1)
    # The working memory of a full micro-batch: token_budget tokens in rows of seq_len.
    seq_len = min(args.seq_len, args.token_budget, base.max_length - 1)
    work_gb = None
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        _machine.reset_peak(device)
        engine.forward([ForwardItem(created[0], [datum(seq_len) for _ in range(args.token_budget // seq_len)])],
                       backward=True)
        engine.optim_steps([(created[0], adam)])
        work_gb = (torch.cuda.max_memory_allocated(device) - before) / _machine.GB
        _machine.free_device_memory(device)
    state = engine.adapters[created[0]].state_tensors()
    adapter_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if not k.startswith("g"))
    params = sum(t.numel() for t in engine.adapters[created[0]].parameters())

    def room() -> float:
        """Bytes left for adapters: free device memory (torch's cache counts as free) less the
        working reserve (10% on top, for allocator fragmentation) and 1 GiB of margin."""
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free - 1.1 * work_gb * _machine.GB - _machine.GB

    t0 = time.monotonic()
    stop = "max_adapters"
    alloc_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    n_before = len(created)
    while len(created) < args.max_adapters:
        if device.type == "cuda" and room() < 8 * adapter_bytes:
            stop = "memory"
            break
        if time.monotonic() - t0 > args.seconds:
            stop = "time"
            break
        add(min(8, args.max_adapters - len(created)))
    measured_mb = None
    if device.type == "cuda" and len(created) > n_before:
        measured_mb = (torch.cuda.memory_allocated(device) - alloc_before) / (len(created) - n_before) / 2 ** 20
    resident, method = None, "no device memory limit off CUDA"
    if device.type == "cuda":
        per = max(adapter_bytes, (measured_mb or 0) * 2 ** 20)
        extra = max(0, int(room() // per))
        resident = len(created) + extra
        method = "filled" if extra == 0 else f"filled {len(created)}, estimated {extra} more"
    print(json.dumps({
        "bench": "resident", "model": args.model, "rank": args.rank, "adapter_params": params,
        "adapter_mb": round(adapter_bytes / 2 ** 20, 2), "allocator_mb_per_adapter": None if measured_mb is None
        else round(measured_mb, 2), "model_gb": model_gb, "token_budget": args.token_budget, "seq_len": seq_len,
        "work_gb": None if work_gb is None else round(work_gb, 2), "created": len(created), "stopped_by": stop,
        "resident_adapters": resident, "method": method,
        "total_gb": round(torch.cuda.get_device_properties(device).total_memory / _machine.GB, 1)
        if device.type == "cuda" else None,
        "machine": _machine.machine(device, dtype),
    }), flush=True)


# ------------------------------------------------------------------------ step: cuda_tests


def cuda_only_tests() -> list[str]:
    """Node ids of the tests under tests/ that skip without CUDA: a skipif decorator whose
    condition reads torch.cuda.is_available(), on the `def test_...` that follows."""
    import re

    ids = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        pending = False
        for line in path.read_text().splitlines():
            if re.match(r"\s*@pytest\.mark\.skipif\(.*cuda\.is_available\(\)", line):
                pending = True
            elif pending and (m := re.match(r"\s*def (test_\w+)", line)):
                ids.append(f"tests/{path.name}::{m.group(1)}")
                pending = False
            elif pending and not line.strip().startswith("@"):
                pending = False
    return ids


def step_cuda_tests(args) -> None:
    """The CUDA-only tests under pytest (with pyzmq hidden, without tests/conftest.py,
    which starts servers and imports the SDK); skipped when pytest is not installed."""
    import importlib.util

    ids = cuda_only_tests()
    if not ids:
        print(json.dumps({"bench": "cuda_tests", "status": "skipped", "reason": "no CUDA-only tests found"}))
        return
    if importlib.util.find_spec("pytest") is None:
        print(json.dumps({"bench": "cuda_tests", "status": "skipped", "reason": "pytest is not installed",
                          "tests": ids}), flush=True)
        return
    import _machine  # noqa: F401  (hides pyzmq, as on the GPU machine)

    import pytest

    outcomes: dict[str, str] = {}

    class Collect:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                outcomes.setdefault(report.nodeid, report.outcome)

    os.chdir(ROOT)
    code = pytest.main([*ids, "-q", "-p", "no:cacheprovider", "--noconftest", "-rfEs",
                        "-W", "ignore::pytest.PytestConfigWarning"], plugins=[Collect()])
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    for nodeid, outcome in outcomes.items():
        print(json.dumps({"bench": "cuda_tests", "test": nodeid, "outcome": outcome,
                          "ok": outcome != "failed"}), flush=True)
    print(json.dumps({"bench": "cuda_tests", "pytest_exit": int(code), "tests": ids, **counts,
                      "ok": int(code) in (0, 5) and counts["failed"] == 0}), flush=True)


# ------------------------------------------------------------------------ entry point


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="results folder (default: $OUT, else a new folder under /tmp)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, any device (CI: CPU, under 2 minutes)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps together (default 440 on CUDA, 110 with --tiny)")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    parser.add_argument("--step", choices=["env", "exactness", "resident", "cuda_tests"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default=QWEN)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--max-adapters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=35.0, help="resident: time to fill adapters")
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.step:
        {"env": step_env, "exactness": step_exactness, "resident": step_resident,
         "cuda_tests": step_cuda_tests}[args.step](args)
        return 0
    out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(
        prefix=f"gpu_check-{datetime.datetime.now():%Y%m%d-%H%M%S}-")
    if not args.tiny and not _has_cuda():
        out_path = Path(out)
        out_path.mkdir(parents=True, exist_ok=True)
        text = "GPU check: torch sees no CUDA device here; run with --tiny for the CPU version.\nRESULT: FAILED: no CUDA\n"
        (out_path / "summary.txt").write_text(text)
        (out_path / "results.jsonl").write_text(json.dumps({"step": "summary", "bench": "summary", "failed": ["no_cuda"]}) + "\n")
        print(text, end="")
        return 2
    budget = args.budget if args.budget is not None else (110.0 if args.tiny else 440.0)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    return run_all(Path(out), args.tiny, budget, only)


def _has_cuda() -> bool:
    """Whether torch sees CUDA, asked in a child process so the driver holds no CUDA context."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


if __name__ == "__main__":
    sys.exit(main())
