"""The numbers a model card reports: accuracy and per-class accuracy of the exported model.

In order of preference: the logits training stored in ``RUN_DIR/predictions.npz`` for
this very checkpoint (same epoch, same test-time augmentation as the export); a fresh
pass over the run's evaluation split when the data is reachable; the accuracy recorded
in the checkpoint's history, without a per-class table, when it is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.errors import CifarlabError
from cifarlab.export.source import Source

#: Written by training at its end (cifarlab.report.predictions); read here, not imported.
PREDICTIONS_FILE = "predictions.npz"


@dataclass
class Results:
    """Accuracy of the exported model on an evaluation split, and where the number comes from."""

    accuracy: float | None
    n: int
    split: str
    how: str
    per_class: list[tuple[str, float, int]] = field(default_factory=list)  # (class, accuracy, images)

    @property
    def stderr(self) -> float | None:
        """Binomial standard error of ``accuracy``."""
        if self.accuracy is None or not self.n:
            return None
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.n)


def card_results(src: Source, tta: str, *, device: str = "cpu", data: str | None = None) -> Results:
    """The best available :class:`Results` for the model ``src`` holds, predicting with ``tta``."""
    ckpt = src.ckpt
    classes = list(ckpt["classes"])
    trained_tta = (ckpt.get("config") or {}).get("tta", "none")
    split = _eval_split(ckpt)
    if src.run_dir is not None and tta == trained_tta and "epoch" in ckpt:
        stored = _stored_predictions(src.run_dir / PREDICTIONS_FILE, int(ckpt["epoch"]))
        if stored is not None:
            how = f"the run's final evaluation (epoch {ckpt['epoch']}, test-time augmentation: {tta})"
            return _from_logits(*stored, classes, split, how)
    from cifarlab.evaluate import load_for_inference, predict_split

    overrides: dict[str, Any] = {"tta": tta, "device": device, "precision": "fp32", **({"data": data} if data else {})}
    try:
        run = load_for_inference(str(src.path), overrides, load_data=True)
    except CifarlabError as exc:
        return _from_history(ckpt, split, f"the run's data is not reachable ({exc})")
    res = predict_split(run)
    how = f"evaluated at export, fp32, test-time augmentation: {tta}"
    return _from_logits(res.logits, res.targets, classes, run.dataset.eval_split, how)


def _eval_split(ckpt: dict[str, Any]) -> str:
    return "holdout" if (ckpt.get("config") or {}).get("holdout") else "test"


def _stored_predictions(path: Path, epoch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["epoch"]) != epoch:
                return None
            return torch.from_numpy(z["logits"].copy()), torch.from_numpy(z["targets"].copy())
    except (OSError, KeyError, ValueError):
        return None  # unreadable: evaluate instead


def _from_logits(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], split: str, how: str) -> Results:
    preds = logits.argmax(1)
    per_class = []
    for k, name in enumerate(classes):
        mask = targets == k
        count = int(mask.sum())
        per_class.append((name, float((preds[mask] == k).float().mean()) if count else float("nan"), count))
    accuracy = float((preds == targets).float().mean()) if len(targets) else None
    return Results(accuracy, int(len(targets)), split, how, per_class)


def _from_history(ckpt: dict[str, Any], split: str, why: str) -> Results:
    rows = [r for r in ckpt.get("history") or [] if r.get("test_acc") is not None]
    last = rows[-1] if rows else (ckpt.get("metrics") or {})
    accuracy = last.get("test_acc")
    if accuracy is None:
        return Results(None, 0, split, f"{why}, and the checkpoint records no test accuracy")
    how = f"the training history (epoch {last.get('epoch', ckpt.get('epoch', '?'))}); {why}, so no per-class table"
    return Results(float(accuracy), 0, split, how)
