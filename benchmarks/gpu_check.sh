#!/usr/bin/env bash
# The GPU check (issue 20): the engine's CUDA path verified and measured in one command.
#
# On a GPU machine, from the repository root, in at most 8 minutes:
#     bash benchmarks/gpu_check.sh "$OUT"
# Through the device tool (its $OUT comes back with the results):
#     run(command='bash benchmarks/gpu_check.sh "$OUT"', timeout_s=540)
# On any machine, tiny model (CI runs this; CPU, under 2 minutes):
#     bash benchmarks/gpu_check.sh --tiny RESULTS_DIR
#
# Results folder: the argument, else $OUT, else a new folder under /tmp (printed). It gets
# results.jsonl (every figure, one JSON line each, tagged with its step, plus one status
# line per step and a final summary line), summary.txt (short, also printed at the end) and
# logs/<step>.log. Steps, most important first, each in its own process under a time box,
# a failure recorded and the next step run regardless: env (versions, API checks), exactness
# (bf16 on the device vs PEFT), train_throughput (qwen3-1.7b, 16 x 2048, MFU), multitenant
# (K = 1, 4, 8, 16 on qwen3-0.6b vs serial PEFT and a batched PEFT step), decode (64 x 128
# over 8 adapters vs HF generate + PEFT and the base model), resident (rank-32 adapters on
# qwen3-1.7b before offload), cuda_tests (pytest, when installed). Details and tolerances:
# benchmarks/gpu_check.py.
#
# Needs only what the GPU machine has: torch (CUDA), transformers, peft, safetensors, numpy
# (no pyzmq, no network, nothing installed). Exit status 0 when every step passed or was
# skipped for a stated reason (e.g. no pytest), 1 when one failed, 2 without CUDA (no --tiny).
# Options after the folder go to gpu_check.py: --budget SECONDS (default 440; 110 with
# --tiny), --only env,exactness,...
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=()
tiny=0
out=""
for a in "$@"; do
    case "$a" in
        --tiny) tiny=1; args+=("$a") ;;
        -*) args+=("$a") ;;
        *) if [ -z "$out" ] && [[ "${prev:-}" != --budget && "${prev:-}" != --only ]]; then out="$a"; else args+=("$a"); fi ;;
    esac
    prev="$a"
done
out="${out:-${OUT:-}}"
if [ -z "$out" ]; then
    out="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check-$(date +%Y%m%d-%H%M%S)-XXXX")"
fi
mkdir -p "$out"

# A Python that has torch: $PYTHON, else python3, else python.
py="${PYTHON:-}"
if [ -z "$py" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            py="$candidate"; break
        fi
    done
fi
if [ -z "$py" ]; then
    printf 'GPU check: no Python with torch found (set $PYTHON)\nRESULT: FAILED: no torch\n' | tee "$out/summary.txt"
    exit 2
fi

# Hard cap over the driver's own budget, so one command always ends (and leaves a summary).
if [ "$tiny" = 1 ]; then cap=170; else cap=480; fi
timeout -k 10 "$cap" "$py" "$here/gpu_check.py" "$out" ${args[@]+"${args[@]}"}
rc=$?
if [ ! -s "$out/summary.txt" ]; then
    {
        echo "GPU check: the driver ended without a summary (exit status $rc; 124 = killed at the ${cap} s cap)."
        echo "Partial results: $out/results.jsonl, logs in $out/logs/."
        echo "RESULT: FAILED: driver"
    } | tee "$out/summary.txt"
    [ "$rc" = 0 ] && rc=1
fi
echo "results: $out"
exit "$rc"
