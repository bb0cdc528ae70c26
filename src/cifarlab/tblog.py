"""``--tensorboard``: the run's numbers and pictures for TensorBoard, in ``RUN_DIR/tb/``.

Per epoch: train loss/accuracy and the evaluation's (tags ``train/*`` and ``test/*``, or
``holdout/*`` with ``--holdout``) at step = epoch; the learning rate of every optimizer
step (tag ``lr``, step = global step); at the start the augmented-samples grid the report
shows (``augmentations``); at the end the report writes its confusion matrix and
misclassified gallery (``confusion_matrix``, ``misclassified``) with :func:`write_pngs`.
Rank 0 only. A resumed run opens a new event file in the same folder, which TensorBoard
reads as one run. ``tensorboard --logdir runs`` shows every run under ``runs/``.

The LRs are the Python floats the scheduler already hands the step hook and the scalars
are the epoch's row: logging adds no host sync to the training step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cifarlab.config import TrainConfig
from cifarlab.errors import CifarlabError

TB_DIR = "tb"
INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install 'cifarlab[tensorboard]'"


def require(cfg: TrainConfig) -> None:
    """With ``cfg.tensorboard``, fail with the install hint unless TensorBoard imports (before any data is read)."""
    if cfg.tensorboard:
        _writer_class()


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package itself
        raise CifarlabError(INSTALL_HINT) from None
    return SummaryWriter


class TensorBoardLog:
    """A SummaryWriter on ``RUN_DIR/tb``, or a no-op when the run does not log to TensorBoard."""

    def __init__(self, log_dir: Path | None):
        self.writer = _writer_class()(log_dir=str(log_dir)) if log_dir is not None else None

    @classmethod
    def for_run(cls, cfg: TrainConfig, run_dir: Path, dataset: Any, *, main: bool, resuming: bool) -> "TensorBoardLog":
        """The run's log (off unless ``cfg.tensorboard`` on rank 0); a new run starts with the augmentation grid."""
        if not (cfg.tensorboard and main):
            return cls(None)
        log = cls(Path(run_dir) / TB_DIR)
        if not resuming:
            from cifarlab.data import AugmentSpec
            from cifarlab.data.preview import augmentation_grid, sample_images

            spec = AugmentSpec.parse(cfg.augment)
            # The report's grid, drawn with the same seed: the same pixels in both places.
            log.image("augmentations", augmentation_grid(sample_images(dataset.train), spec, dataset.mean, dataset.std, seed=cfg.seed), 0)
            log.writer.flush()
        return log

    def epoch(self, row: Mapping[str, Any], lrs: Sequence[float], first_step: int) -> None:
        """One epoch's metrics row (step = its epoch) and the LR of each of its steps
        (global steps ``first_step + 1`` on)."""
        if self.writer is None:
            return
        w, epoch = self.writer, int(row["epoch"])
        split = row.get("eval_split", "test")
        w.add_scalar("train/loss", row["train_loss"], epoch)
        w.add_scalar("train/accuracy", row["train_acc"], epoch)
        if row.get("test_acc") is not None:  # epochs that eval_every skips have no evaluation
            w.add_scalar(f"{split}/loss", row["test_loss"], epoch)
            w.add_scalar(f"{split}/accuracy", row["test_acc"], epoch)
        for i, lr in enumerate(lrs):
            w.add_scalar("lr", float(lr), first_step + i + 1)
        w.flush()  # TensorBoard shows each epoch as it ends, and a kill loses nothing written

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) image."""
        if self.writer is not None:
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the event file (safe to call twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_pngs(run_dir: str | Path, pngs: Mapping[str, Path], step: int) -> bool:
    """Add PNG files as images (tag -> file) to ``run_dir``'s TensorBoard log, if the run
    has one (``RUN_DIR/tb/``); return whether it had. Missing files are left out."""
    tb = Path(run_dir) / TB_DIR
    if not tb.is_dir():
        return False
    from PIL import Image

    log = TensorBoardLog(tb)
    try:
        for tag, path in pngs.items():
            if Path(path).is_file():
                with Image.open(path) as im:
                    log.image(tag, np.asarray(im.convert("RGB")), step)
    finally:
        log.close()
    return True
