"""Make freed host memory reusable without page faults, for the engine's CPU path.

A training step on a CPU allocates and frees the same large tensors every step (a
micro-batch's [tokens x vocab] logits, their log-softmax and gradient are megabytes each).
torch allocates host memory with 64-byte aligned `posix_memalign`, and glibc serves those
in a way that does not reuse the block just freed: the heap grows to fresh pages, or (above
the mmap threshold, 32 MiB at most) maps new ones, and each first write of a 4 KiB page is a
page fault (in a virtual machine, a dear one). `tests/test_host_memory.py` shows the faults
per page; on the 2-core CI box they cost about 10-25% of a small multi-tenant step.

Two settings together stop it:
  * torch's THP_MEM_ALLOC_ENABLE=1: blocks of 2 MiB and more are aligned to 2 MiB (and
    offered to transparent huge pages), which glibc reuses in place once freed;
  * glibc's mallopt: such blocks stay in the heap (mmap threshold 1 GiB) and freed heap top
    is kept, not trimmed (trim threshold 1 GiB).

The cost is memory: the process keeps what it freed, i.e. stays near its peak, which a
training server reaches every step anyway. torch reads THP_MEM_ALLOC_ENABLE once, at its
first allocation, so `tune_host_allocator` must run before torch is imported. Where the C
library is not glibc the mallopt half is skipped.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
LIMIT_BYTES = 1 << 30


def tune_host_allocator() -> dict[str, bool]:
    """Apply both settings (see the module docstring); which took effect, by name."""
    aligned = "torch" not in sys.modules  # torch has read the variable once imported
    if aligned:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    aligned = aligned and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    return {"huge_page_aligned": aligned, "freed_memory_kept": _keep_freed_memory()}


def _keep_freed_memory() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl has no such tuning)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LIMIT_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, LIMIT_BYTES))
