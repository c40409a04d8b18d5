"""server.host_memory: with its settings a large tensor freed and allocated again is reused
in place, with no new page faults; with torch's and glibc's defaults every allocation of
such a size writes fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, statistics, sys
    from server.host_memory import tune_host_allocator
    if sys.argv[1] == "tuned":
        assert tune_host_allocator() == {"huge_page_aligned": True, "freed_memory_kept": True}
    import torch
    worst = 0.0
    for mib in (4, 16, 64):  # a logits chunk's size and above glibc's own mmap threshold
        pages = (mib << 20) // resource.getpagesize()
        faults = []
        for i in range(7):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = torch.empty(mib << 18, dtype=torch.float32)
            t.fill_(1.0)
            del t
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
        # The first allocation of a size faults in either case; the median of the others
        # ignores a rare reclaim by a loaded machine.
        worst = max(worst, statistics.median(faults[1:]))
    print(worst)
""")


def faults_per_page(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_tuned_allocator_reuses_freed_tensors_without_page_faults():
    assert faults_per_page("default") > 0.4  # fresh pages, over and over
    assert faults_per_page("tuned") < 0.1  # the freed block, reused as it is


def test_tuning_after_torch_loaded_says_the_alignment_did_not_take():
    proc = subprocess.run([sys.executable, "-c", "import torch\nfrom server.host_memory import tune_host_allocator\n"
                           "print(tune_host_allocator()['huge_page_aligned'])"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
