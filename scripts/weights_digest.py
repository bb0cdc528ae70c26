"""Digest of what a few tiny training runs produce: weights, optimizer state and metrics.

Used to check that a refactor changes no behaviour: run it before and after on the same
machine and compare the output (it must be identical, byte for byte). The runs cover the
fast net with Muon and --lr auto, the fast net with lookahead and progressive resize,
and ResNet18 with SGD, each on 2 epochs of synthetic data on the CPU.

    python scripts/weights_digest.py > before.json   # on the old commit
    python scripts/weights_digest.py > after.json    # on the new one
    cmp before.json after.json
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

from cifarlab.config import resolve_config
from cifarlab.train import fit

BASE = dict(
    dataset="synthetic", num_classes=4, epochs=2, batch_size=32, limit_train=256, limit_test=128,
    device="cpu", tta="flip", seed=1, eval_every=1, pct_start=0.25, div_factor=10.0,
)
RUNS = {
    "fast-auto-lr": ("fast", {"lr": "auto"}),
    "fast-lookahead-resize": ("fast", {"lr": 0.2, "lookahead": True, "progressive_resize": "24:0.5"}),
    "resnet18-sgd": ("s11-resnet18-onecycle", {"lr": 0.01, "limit_train": 128, "limit_test": 64, "stop_on_stall": False}),
}
# Wall-clock fields differ between any two runs; everything else must not.
TIMES = {"seconds", "train_seconds", "elapsed"}


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:16]


def _flatten(state, prefix="") -> dict:
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix] = state
    return out


def run_one(name: str, preset: str, overrides: dict, root: Path) -> dict:
    cfg = resolve_config(preset=preset, overrides={**BASE, **overrides, "out": str(root / name)})
    # Commits before the on_finish callback (2026-12-03) took report=False; later ones write
    # no report unless given a callback.
    extra = {"report": False} if "report" in inspect.signature(fit).parameters else {}
    fit(cfg, progress=False, stream=io.StringIO(), **extra)
    ckpt = torch.load(root / name / "checkpoints" / "last.pt", weights_only=True)
    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in TIMES}
        for line in (root / name / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "weights": _digest(ckpt["state_dict"]),
        "optimizer": _digest(_flatten(ckpt["optimizer"])),
        "lrs": _digest({"lrs": ckpt["lrs"]}),
        "metrics": metrics,
    }


def main() -> int:
    torch.set_num_threads(1)  # thread count changes float summation order
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: run_one(name, preset, ov, Path(tmp)) for name, (preset, ov) in RUNS.items()}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
