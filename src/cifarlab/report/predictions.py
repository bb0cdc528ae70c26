"""The final evaluation's test predictions, stored beside a run as ``predictions.npz``.

Training writes them at the end of ``fit``; ``build`` and ``compare`` read them back so a
finished run reports in seconds without another pass over the test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PREDICTIONS_FILE = "predictions.npz"


def save_predictions(run_dir: str | Path, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> Path:
    """Store the final evaluation's test logits so reports need no new pass over the test set."""
    from cifarlab.checkpoint import atomic_write

    path = Path(run_dir) / PREDICTIONS_FILE

    def write(f) -> None:
        np.savez(f, logits=logits.float().cpu().numpy(), targets=targets.long().cpu().numpy(), epoch=np.int64(epoch))

    atomic_write(path, write)
    return path


def load_predictions(run_dir: str | Path, epoch: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored logits/targets if they belong to ``epoch`` and a test split of ``n_test`` images."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["epoch"]) != int(epoch) or z["targets"].shape[0] != n_test:
                return None
            return torch.from_numpy(z["logits"].copy()), torch.from_numpy(z["targets"].copy())
    except (OSError, KeyError, ValueError):
        return None  # unreadable: predict again
