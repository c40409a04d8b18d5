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
