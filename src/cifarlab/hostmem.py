"""Host-memory allocator setting for training on a CPU.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A CPU training step allocates and
frees activations of that size every step (the fast net at batch 1024: 134 MB per bf16
activation of its first block), so each step page-faults all of them in again, and the
zero-fill of max-pool's backward, the first write to those pages, pays for it. In a VM a
page fault is expensive; benchmarks/alloc_fill.py and benchmarks/step_time.py measure
what that costs, and docs/performance.md has the figures.

Keeping freed memory in the heap is what jemalloc/tcmalloc (Intel's recommendation for
PyTorch on CPUs) achieve by preloading; ``mallopt`` gets the same effect with nothing to
install. The cost is a resident set that stays at its peak. Results do not change: only
where the memory comes from does.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

OPT_OUT_ENV = "CIFARLAB_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for large blocks, no trimming.

    Process-wide and irreversible in practice, so only entry points that own the process
    call it (the ``cifarlab`` command, the benchmarks). Returns True when the setting was
    applied; False off glibc/Linux, or when ``CIFARLAB_KEEP_FREED_MEMORY=0`` opts out.
    """
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl names its libc differently)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # M_MMAP_MAX 0: large blocks come from the heap, whose freed pages stay mapped.
    # M_TRIM_THRESHOLD -1: never hand the top of the heap back to the kernel either.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
