"""Per-conv timing of oneDNN's convolution against the im2col GEMM path (cifarlab/gemm_conv.py).

For every distinct conv of a model (shapes recorded from one forward pass at the given
batch and image size), times forward + backward (input and weight gradients) through
``F.conv2d`` and through the GEMM path, in the precision and memory format cifarlab picks
for this device; then times whole training steps of the model with and without
:func:`cifarlab.gemm_conv.use_gemm_convs`, alternating windows in one process.

    python benchmarks/conv_paths.py --model resnet18 --batch-size 128
    python benchmarks/conv_paths.py --model fast --batch-size 1024 --size 32

Last line: one JSON object with the per-conv rows and the step rates.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def _time(fn, repeat: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per conv and path")
    p.add_argument("--windows", type=int, default=5, help="alternating step-rate windows per setting")
    p.add_argument("--steps", type=int, default=3, help="training steps per window")
    args = p.parse_args(argv)
    from cifarlab.hostmem import keep_freed_memory

    keep_freed_memory()  # as the cifarlab command does

    from cifarlab.config import TrainConfig
    from cifarlab.gemm_conv import GemmConv2dFunction, supports_gemm, takes_gemm_path, use_gemm_convs
    from cifarlab.models import create_model
    from cifarlab.runtime import DTYPES, Runtime

    # As `cifarlab train` resolves the defaults, but every conv on oneDNN: the paths are
    # compared below.
    rt = Runtime.resolve(TrainConfig(gemm_convs="off"))
    device, precision, channels_last = rt.device, rt.precision, rt.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = rt.prepare(create_model(args.model))
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    seen: dict[tuple, dict] = {}

    def record(module, inputs):
        key = (tuple(inputs[0].shape), tuple(module.weight.shape), module.stride, module.padding)
        seen.setdefault(key, {"module": module, "count": 0})["count"] += 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if supports_gemm(m)]
    with torch.no_grad(), rt.autocast():
        model(x)
    for h in hooks:
        h.remove()

    dtype = DTYPES.get(precision, torch.float32)
    rows = []
    for (in_shape, w_shape, stride, padding), entry in seen.items():
        conv = entry["module"]
        first = in_shape[1] == 3  # the stem sees the images, which need no gradient
        inp = torch.randn(in_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        inp.requires_grad_(not first)
        w = conv.weight.detach().to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
        out = F.conv2d(inp, w, None, stride, padding)
        grad = torch.randn_like(out).contiguous(memory_format=fmt)

        def native():
            F.conv2d(inp, w, None, stride, padding).backward(grad)

        def gemm():
            GemmConv2dFunction.apply(inp, w, stride, padding, tuple(out.shape[-2:])).backward(grad)

        row = {
            "input": list(in_shape), "weight": list(w_shape), "stride": list(stride), "count": entry["count"],
            "gemm_path": takes_gemm_path(w, tuple(out.shape[-2:])),
            "native_ms": round(_time(native, args.repeat), 2), "gemm_ms": round(_time(gemm, args.repeat), 2),
        }
        rows.append(row)
        print(f"{str(in_shape):22s} w{str(w_shape):20s} s{stride[0]} x{entry['count']}: "
              f"native {row['native_ms']:7.2f} ms  gemm {row['gemm_ms']:7.2f} ms  "
              f"{'GEMM' if row['gemm_path'] else 'native'} path")

    fast_model = copy.deepcopy(model)
    switched = use_gemm_convs(fast_model)
    rates: dict[str, list[float]] = {"native": [], "gemm": []}
    models = {"native": model, "gemm": fast_model}
    opts = {k: torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
            for k, m in models.items()}

    def step(name):
        with rt.autocast():
            loss = F.cross_entropy(models[name](x).float(), y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    for name in models:
        step(name)
    for _ in range(args.windows):
        for name in models:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"step: native {med['native']:.1f} img/s, gemm {med['gemm']:.1f} img/s "
          f"({med['gemm'] / med['native']:.3f}x), {switched} convs switched")
    print(json.dumps({
        "model": args.model, "batch_size": args.batch_size, "size": args.size, "precision": precision,
        "threads": torch.get_num_threads(), "convs": rows,
        "step_img_s": {k: round(v, 1) for k, v in med.items()},
        "step_windows": {k: [round(r, 1) for r in v] for k, v in rates.items()},
        "ratio": round(med["gemm"] / med["native"], 3), "date": time.strftime("%Y-%m-%d"),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
