"""Where a training step's time goes: torch.profiler's top ops for one model.

Runs cifarlab's training step (device-resident batch, the precision and memory format
cifarlab picks for this device) and prints the profiler table, then one JSON line with
the top ops' share of self CPU time and the step's achieved GFLOP/s.

    python benchmarks/profile_step.py --model fast --batch-size 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fast")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    from cifarlab.hostmem import keep_freed_memory

    keep_freed_memory()  # as the cifarlab command does (CIFARLAB_KEEP_FREED_MEMORY=0: off)

    from cifarlab.config import TrainConfig
    from cifarlab.models import create_model
    from cifarlab.runtime import Runtime
    from cifarlab.summary import model_summary

    rt = Runtime.resolve(TrainConfig())  # the defaults, resolved as `cifarlab train` resolves them
    device, precision, channels_last, gemm_convs = rt.device, rt.precision, rt.channels_last, rt.gemm_convs
    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    macs = model_summary(model).macs_per_image
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = rt.prepare(model)  # as `cifarlab train` does
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01, momentum=0.9, nesterov=True)

    def step():
        with rt.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    img_s = args.steps * args.batch_size / seconds
    # forward MACs x 2 FLOP, x 3 for forward + input-grad + weight-grad passes
    gflops = img_s * macs * 2 * 3 / 1e9
    print(json.dumps({
        "model": args.model, "batch_size": args.batch_size, "device": str(device), "precision": precision,
        "channels_last": channels_last, "gemm_convs": gemm_convs, "img_s_under_profiler": round(img_s, 1),
        "train_gflop_s": round(gflops, 1), "macs_per_image": macs,
        "top_ops": {e.key: round(100 * e.self_cpu_time_total / total, 1) for e in top},
        "date": time.strftime("%Y-%m-%d"),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
