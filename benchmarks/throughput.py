"""Training throughput: a typical notebook pipeline vs cifarlab's step, side by side.

(a) typical: what the seed notebooks do — a torchvision-style Dataset over a uint8 array
    (PIL image per sample, RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor +
    Normalize per image), DataLoader with 2 workers, fp32 eager NCHW model.
(b) cifarlab: the whole split on the device as uint8, batched on-device augmentation,
    the precision and memory format cifarlab picks for this device (engine.resolve_*).

Both train the same architecture at the same batch size. The process keeps freed memory
for reuse (cifarlab.hostmem, as the cifarlab command does) for both methods, since the
setting is process-wide: the typical pipeline gets it too, so the ratio does not credit
cifarlab with it. `CIFARLAB_KEEP_FREED_MEMORY=0` runs both with glibc's default. Timed windows of each method
alternate (a, b, a, b, ...) so drifts in machine load hit both; warm-up steps are
excluded; the figure per method is the median over windows. Last line: one JSON object.

    python benchmarks/throughput.py [--data DIR] [--models resnet18,fast] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn


def typical_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std, workers: int):
    """torchvision.datasets.CIFAR10-style dataset + per-image transforms + DataLoader."""
    from PIL import Image
    from torchvision import transforms as T

    class ArrayDataset(torch.utils.data.Dataset):
        def __init__(self, hwc: np.ndarray, targets: np.ndarray):
            self.data, self.targets = hwc, targets
            self.transform = T.Compose(
                [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
            )

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])

    ds = ArrayDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy())
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def endless(loader_factory):
    """Yield batches forever, restarting the loader (new epoch) when it runs out."""
    epoch = 0
    while True:
        loader = loader_factory(epoch)
        yield from loader
        epoch += 1


class Method:
    """One way of training: a batch source and a step function, timed in windows."""

    def __init__(self, name, model, batches, runtime, lr=0.01):
        self.name, self.model, self.batches = name, model, batches
        self.autocast = runtime.autocast
        self.channels_last = runtime.channels_last
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, nesterov=True)
        self.loss = nn.CrossEntropyLoss()
        self.device = runtime.device
        self.rates: list[float] = []

    def steps(self, n: int) -> float:
        """Run n training steps (data loading included); return seconds."""
        self.model.train()
        start = time.perf_counter()
        for _ in range(n):
            x, y = next(self.batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                loss = self.loss(self.model(x).float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def bench_model(name, data, device, batch_size, windows, steps_per_window, warmup, workers, gemm_setting="auto"):
    from cifarlab.config import TrainConfig
    from cifarlab.data import AugmentSpec, DeviceLoader
    from cifarlab.models import create_model
    from cifarlab.runtime import Runtime

    torch.manual_seed(0)
    typical_model = create_model(name).to(device)
    fast_model = create_model(name)
    fast_model.load_state_dict(typical_model.state_dict())
    rt = Runtime.resolve(TrainConfig(device=str(device), gemm_convs=gemm_setting))
    precision, channels_last = rt.precision, rt.channels_last
    # The model exactly as `cifarlab train` prepares it for this device.
    fast_model = rt.prepare(fast_model)

    tl = typical_loader(data.train.images, data.train.labels, batch_size, data.mean, data.std, workers)
    typical = Method("typical", typical_model, endless(lambda e: tl), Runtime(device, "fp32", False))
    dl = DeviceLoader(
        data.train, batch_size, device=device, mean=data.mean, std=data.std, shuffle=True,
        augment=AugmentSpec(crop_pad=4, flip=True), drop_last=True, channels_last=channels_last,
    )

    def cifarlab_epoch(e):
        dl.set_epoch(e)
        return dl

    ours = Method("cifarlab", fast_model, endless(cifarlab_epoch), rt)
    for m in (typical, ours):
        m.steps(warmup)
    for _ in range(windows):
        for m in (typical, ours):
            seconds = m.steps(steps_per_window)
            m.rates.append(steps_per_window * batch_size / seconds)
    t, o = statistics.median(typical.rates), statistics.median(ours.rates)
    return {
        "typical_img_s": round(t, 1),
        "cifarlab_img_s": round(o, 1),
        "ratio": round(o / t, 3),
        "cifarlab_precision": precision,
        "cifarlab_channels_last": channels_last,
        "cifarlab_gemm_convs": rt.gemm_convs,
        "typical_windows": [round(r, 1) for r in typical.rates],
        "cifarlab_windows": [round(r, 1) for r in ours.rates],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="imagefolder root (e.g. ../shared/datasets/cifar10-jpeg); default: synthetic")
    p.add_argument("--models", default="resnet18,fast")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=5, help="timed windows per method")
    p.add_argument("--steps", type=int, default=4, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the typical pipeline")
    p.add_argument("--device", default="auto")
    p.add_argument("--gemm-convs", default="auto", choices=("auto", "on", "off"),
                   help="cifarlab's small-map conv path (the gemm_convs config key); off measures it without")
    args = p.parse_args(argv)

    from cifarlab.data import load_dataset
    from cifarlab.runtime import resolve_device
    from cifarlab.hostmem import keep_freed_memory

    kept = keep_freed_memory()

    device = resolve_device(args.device)
    data = load_dataset("imagefolder", args.data) if args.data else load_dataset("synthetic", None, synthetic_train=5000)
    results = {}
    for name in args.models.split(","):
        r = bench_model(name, data, device, args.batch_size, args.windows, args.steps, args.warmup, args.workers, args.gemm_convs)
        results[name] = r
        print(
            f"{name}: typical {r['typical_img_s']} img/s, cifarlab {r['cifarlab_img_s']} img/s "
            f"({r['cifarlab_precision']}, channels_last={r['cifarlab_channels_last']}), ratio {r['ratio']}x",
            file=sys.stderr,
        )
    results["_meta"] = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "batch_size": args.batch_size,
        "data": args.data or "synthetic",
        "keep_freed_memory": kept,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
