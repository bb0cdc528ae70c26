"""Arm R1 of the diagnosis without retraining: the same trained cifarlab models evaluated
with flip-translate TTA whose 1 px translations are padded with zeros (cifarlab's choice
until 2026-12-03) and with reflection (airbench94_muon's, cifarlab's since). Only the evaluation differs, so every seed is
perfectly paired and a run costs two TTA passes per checkpoint.

    python benchmarks/reference/tta_pad.py runs/diagnose/F0/cifarlab-seed*/checkpoints/last.pt

Each checkpoint is evaluated on the split its config names (a --holdout run: its holdout).
Prints one JSON line per checkpoint and a last line with the mean paired difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from cifarlab.engine import predict_logits
from cifarlab.evaluate import load_for_inference, test_loader

PADS = ("constant", "reflect")


def accuracies(checkpoint: str) -> dict:
    """Flip-translate TTA accuracy of ``checkpoint`` with each padding, on its own split."""
    run = load_for_inference(checkpoint)
    loader = test_loader(run)
    correct = {pad: 0 for pad in PADS}
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode(), run.runtime.autocast():
        for x, y in loader:
            for pad in PADS:
                logits = predict_logits(run.model, x, "flip-translate", pad=pad)
                correct[pad] += int((logits.argmax(1) == y).sum())
            n += len(y)
    out = {"checkpoint": checkpoint, "n": n, "holdout": run.cfg.holdout, "seed": run.cfg.seed}
    out.update({f"acc_tta_{pad}": correct[pad] / n for pad in PADS})
    out["delta_reflect_minus_constant"] = out["acc_tta_reflect"] - out["acc_tta_constant"]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="cifarlab checkpoints (.pt)")
    args = p.parse_args(argv)
    rows = []
    for ckpt in args.checkpoints:
        rows.append(accuracies(ckpt))
        print(json.dumps(rows[-1]), flush=True)
    deltas = [r["delta_reflect_minus_constant"] for r in rows]
    summary = {
        "n_checkpoints": len(rows),
        "mean_delta_reflect_minus_constant": statistics.fmean(deltas),
        "deltas": deltas,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
