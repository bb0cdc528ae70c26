"""Images/s of cifarlab's own training step for several (batch size, optimizer) settings.

Uses the real pieces -- DeviceLoader with the preset's augmentation, build_optimizer,
run_epoch's autocast/precision -- on synthetic uint8 images, so it measures only the
step. Settings are timed in alternating windows (a, b, c, a, b, c, ...) so machine drift
hits all of them; warm-up steps are excluded; the figure is the median window. Last
line: one JSON object.

    python benchmarks/step_time.py --model fast --settings 1024:sgd,2000:sgd,2000:muon
    python benchmarks/step_time.py --settings 1024:muon,1024:muon:24,1024:muon:20   # progressive-resize sizes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fast")
    p.add_argument("--settings", default="1024:sgd,2000:sgd,2000:muon", help="comma list of BATCH:OPTIMIZER[:SIZE] (SIZE: train at that progressive-resize size)")
    p.add_argument("--augment", default="translate:2,flip:alt")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    from cifarlab.hostmem import keep_freed_memory

    keep_freed_memory()  # as the cifarlab command does (CIFARLAB_KEEP_FREED_MEMORY=0: off)

    from cifarlab.data import AugmentSpec, DeviceLoader, Split
    from cifarlab.config import TrainConfig
    from cifarlab.models import create_model
    from cifarlab.optim import build_optimizer
    from cifarlab.runtime import Runtime

    rt = Runtime.resolve(TrainConfig())  # the defaults, resolved as `cifarlab train` resolves them
    device, precision, channels_last = rt.device, rt.precision, rt.channels_last
    settings = []
    for text in args.settings.split(","):
        batch, opt_name, *size = text.split(":")
        settings.append((int(batch), opt_name, int(size[0]) if size else None))
    n = max(b for b, _, _ in settings) * (args.steps + args.warmup)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g))

    runners = []
    for batch, opt_name, size in settings:
        torch.manual_seed(0)
        model = rt.prepare(create_model(args.model)).train()
        opt = build_optimizer(model, opt_name, lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3, bias_lr_scale=64, device=device)
        loader = DeviceLoader(split, batch, device=device, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True,
                              augment=AugmentSpec.parse(args.augment), drop_last=True, channels_last=channels_last,
                              epoch_sizes=(size,))
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2)

        def window(steps, model=model, opt=opt, loader=loader, loss_fn=loss_fn, batch=batch):
            it = iter(loader)
            start = time.perf_counter()
            for _ in range(steps):
                x, y = next(it)
                with rt.autocast():
                    loss = loss_fn(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return steps * batch / (time.perf_counter() - start)

        runners.append((f"{batch}:{opt_name}" + (f":{size}" if size else ""), window))
    for _, window in runners:
        window(args.warmup)
    rates: dict[str, list[float]] = {name: [] for name, _ in runners}
    for _ in range(args.windows):
        for name, window in runners:
            rates[name].append(window(args.steps))
    result = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:>12}: median {statistics.median(r):7.1f} img/s  windows {[round(v, 1) for v in r]}")
    print(json.dumps({"model": args.model, "device": str(device), "precision": precision, "channels_last": channels_last,
                      "augment": args.augment, "img_s": result, "machine": platform.processor() or platform.machine(),
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
