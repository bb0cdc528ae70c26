"""What this machine's matrix units can do: achieved GFLOP/s of a large matmul per dtype.

A large square matmul is the best case for the BLAS/oneDNN kernels, so its rate is a
practical ceiling for convolution-bound training. `profile_step.py` reports the training
step's achieved GFLOP/s; dividing the two says how much headroom a faster training step
could still find on this hardware. bf16 is emulated (slow) on CPUs without AVX-512 BF16
or AMX, which this shows directly.

    python benchmarks/cpu_peak.py [--n 2048] [--repeat 5]

Prints one line per dtype, then one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def gflops(n: int, dtype: torch.dtype, repeat: int, device: str) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: kernel selection and first-touch page faults
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9  # one multiply-add = 2 FLOP


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = {}
    from cifarlab.runtime import cpu_has_fast_bf16  # the same test --precision auto uses

    mkldnn_bf16 = cpu_has_fast_bf16() if args.device == "cpu" else None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # emulated bf16 (no native support) can be ~25x slower: a smaller matrix keeps it short
        n = args.n // 2 if name == "bf16" and mkldnn_bf16 is False else args.n
        out[name] = round(gflops(n, dtype, args.repeat, args.device), 1)
        print(f"{name}: {out[name]} GFLOP/s (matmul {n}x{n})", flush=True)
    out["_meta"] = {"device": args.device, "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "native_bf16": mkldnn_bf16,
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
