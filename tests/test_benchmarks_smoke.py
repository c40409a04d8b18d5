"""Each benchmark script runs at its tiniest size and prints valid JSON lines (no timings checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"hostname", "cpu_count", "torch", "device", "gpu", "dtype"}
CASES = [
    ("bench_multitenant.py", ["--ks", "1,2", "--seqs", "1", "--tokens", "8", "--rank", "4", "--repeats", "1"],
     {"adapters", "engine_s", "peft_serial_s", "speedup"}, 2),
    ("bench_train_throughput.py", ["--adapters", "1", "--seqs", "1", "--tokens", "8", "--repeats", "1"],
     {"tokens_per_s", "mfu", "flops_per_token", "params"}, 1),
    ("bench_decode.py", ["--prompts", "2", "--new-tokens", "2", "--adapters", "2", "--repeats", "1"],
     {"ours_tokens_per_s", "hf_peft_tokens_per_s", "base_only_tokens_per_s", "speedup_vs_hf_peft",
      "multi_lora_overhead"}, 1),
    ("bench_abuse.py", ["--steps", "2", "--seq-len", "16", "--abuses", "diverged,malformed"],
     {"abuse", "p50_ms", "p99_ms", "lost", "duplicates", "loss_finite", "server_peak_rss_mb"}, 3),
]


@pytest.mark.parametrize("script,args,keys,lines", CASES, ids=[c[0] for c in CASES])
def test_benchmark_prints_json_lines(script, args, keys, lines):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(records) == lines
    for record in records:
        assert keys <= record.keys(), keys - record.keys()
        assert MACHINE_KEYS <= record["machine"].keys()
        assert record["machine"]["device"] == "cpu" and record["machine"]["dtype"] == "float32"
    if script == "bench_train_throughput.py":
        assert records[0]["mfu"] is None  # no MFU on a CPU


GPU_CHECK_STEPS = ["env", "exactness", "train_throughput", "multitenant", "decode", "resident", "cuda_tests"]


def test_gpu_check_tiny_writes_json_lines_and_a_summary(tmp_path):
    """benchmarks/gpu_check.sh --tiny: every step of the GPU check at tiny size on this
    machine (as on the GPU machine: without pyzmq, which the check hides), JSON lines tagged
    with their step, a status line per step and the summary."""
    out = tmp_path / "gpu-check"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    statuses = {r["step"]: r for r in records if r["bench"] == "step"}
    assert list(statuses) == GPU_CHECK_STEPS
    assert all(s["status"] == "ok" for s in statuses.values()), statuses
    assert records[-1]["bench"] == "summary" and records[-1]["failed"] == []
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)

    env = next(r for r in by_step["env"] if r["bench"] == "env")
    assert env["zmq_hidden"] and all(c["ok"] for c in env["checks"].values()), env["checks"]
    checks = [r for r in by_step["exactness"] if r["bench"] == "exactness"]
    assert len(checks) == 7 and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    fb = next(r for r in checks if r["check"] == "forward_backward_vs_peft")["measured"]
    assert fb["lp_max"] <= 0.05 and fb["grad_cos_min"] > 0.99
    (tp,) = [r for r in by_step["train_throughput"] if r["bench"] == "train_throughput"]
    assert tp["tokens_per_s"] > 0 and tp["mfu"] is None and "peak_gb" in tp
    mt = [r for r in by_step["multitenant"] if r["bench"] == "multitenant"]
    assert [r["adapters"] for r in mt] == [1, 4]
    assert all(r["peft_batched_s"] > 0 and r["fraction_of_ceiling"] > 0 and "engine_peak_gb" in r for r in mt)
    (dec,) = [r for r in by_step["decode"] if r["bench"] == "decode"]
    assert dec["hf_base_tokens_per_s"] > 0 and "ours_peak_gb" in dec
    (res,) = [r for r in by_step["resident"] if r["bench"] == "resident"]
    assert res["created"] == 3 and res["adapter_mb"] > 0
    tests = [r for r in by_step["cuda_tests"] if r["bench"] == "cuda_tests"]
    assert any("test_flex_attention_gradients_equal_sdpa_mask_on_cuda" in r.get("test", "") for r in tests) or \
        tests[-1].get("status") == "skipped"
    for r in records:
        if "machine" in r:
            assert MACHINE_KEYS <= r["machine"].keys()

    summary = (out / "summary.txt").read_text()
    assert summary.rstrip().endswith("RESULT: all 7 steps ok or skipped"), summary
    for step in GPU_CHECK_STEPS:
        assert f"\n{step} " in summary
    assert "7/7 checks pass" in summary
    assert summary in proc.stdout  # printed too
