"""Cost of first-touching freshly allocated memory: zero a reused tensor vs a new one.

A CPU training step allocates activation-sized tensors every step; whether glibc hands
them out as fresh mmaps (page faults on first write) or from the heap decides what
max-pool's backward zero-fill costs. Run once with and once without the allocator
setting cifarlab's command applies (cifarlab.hostmem):

    CIFARLAB_KEEP_FREED_MEMORY=0 python benchmarks/alloc_fill.py
    python benchmarks/alloc_fill.py

Last line: one JSON object with milliseconds per zero-fill.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch


def main() -> int:
    from cifarlab.hostmem import keep_freed_memory

    kept = keep_freed_memory()
    shape = (512, 64, 32, 32)  # the fast net's first-block activation at batch 512
    x = torch.empty(shape, dtype=torch.bfloat16, memory_format=torch.channels_last)
    x.zero_()
    reused, fresh, faults = [], [], []
    for _ in range(11):  # medians: the first fresh tensor faults in either setting
        t = time.perf_counter()
        x.zero_()
        reused.append(time.perf_counter() - t)
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        torch.empty(shape, dtype=torch.bfloat16, memory_format=torch.channels_last).zero_()
        fresh.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    reused, fresh = statistics.median(reused), statistics.median(fresh)
    print(json.dumps({"keep_freed_memory": kept, "mbytes": x.numel() * x.element_size() / 1e6,
                      "reused_ms": round(reused * 1e3, 2), "fresh_ms": round(fresh * 1e3, 2),
                      "fresh_page_faults": statistics.median(faults),
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
