"""What keeps a run from being lost or wasted: graceful stop on SIGINT/SIGTERM, the
stuck-at-chance detector, the finiteness check before every save, and the disk-space
check before a run starts.

Each piece is small and independent of the training loop so it can be tested alone;
``train.fit`` wires them together.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from cifarlab.errors import CifarlabError

# ------------------------------------------------------------------------ signals

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    """Turn SIGINT/SIGTERM into a request to stop at the next step boundary.

    While installed, a signal only sets :attr:`signum`; the training loop finishes the
    current step, saves a checkpoint and exits with 128+signum. Later signals (a second
    Ctrl-C, or torchrun forwarding the same Ctrl-C to its workers) are deliberately
    deferred too: raising in the middle of a save or of an optimizer step is exactly
    what would lose work. SIGKILL still ends a stuck process at once, and because every
    save is atomic, the previous checkpoint survives it.

    Use as a context manager; the previous handlers come back on exit, so Ctrl-C in a
    notebook interrupts cells again after ``fit`` returns or raises.
    """

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.signum = 0
        self._notify = notify
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        # signal.signal only works in the main thread; elsewhere (a notebook's worker
        # thread) training simply runs without graceful interruption.
        if threading.current_thread() is threading.main_thread():
            for sig in _NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            self._say(f"{_NAMES.get(signum, signum)} again: still finishing the step and saving; "
                      "the checkpoint will not be cut short (SIGKILL aborts without saving)")
            return
        self.signum = signum
        self._say(f"{_NAMES.get(signum, signum)} received: finishing the current step, then saving a checkpoint")

    def _say(self, message: str) -> None:
        if self._notify is not None:
            self._notify(message)

    @property
    def name(self) -> str:
        """Name of the first signal received ('' if none)."""
        return _NAMES.get(self.signum, str(self.signum)) if self.signum else ""


def signal_name(signum: int) -> str:
    """'SIGINT', 'SIGTERM' or the number."""
    return _NAMES.get(signum, str(signum))


# ----------------------------------------------------------------- stuck at chance

#: The detector looks at epochs from this one on (1-based): one epoch is not enough
#: to tell a slow start from a run that learns nothing.
STALL_MIN_EPOCHS = 2
#: Loss counts as "at chance" within this fraction of the chance loss, or above it.
STALL_LOSS_MARGIN = 0.02


@dataclass(frozen=True)
class Chance:
    """What a model that learned nothing scores on a training set.

    Predicting the class frequencies gives cross-entropy = entropy of the label
    distribution (ln C for balanced classes) and at best the majority class's accuracy
    (1/C balanced). Label smoothing does not change the former: the loss of a uniform
    prediction is ln C for any smoothing.
    """

    loss: float
    accuracy: float
    num_classes: int

    @classmethod
    def of_labels(cls, labels: torch.Tensor, num_classes: int) -> "Chance":
        """Chance levels of an int label tensor."""
        counts = torch.bincount(labels.long().flatten(), minlength=num_classes).double()
        total = counts.sum().clamp_min(1)
        p = counts / total
        nz = p[p > 0]
        entropy = float(-(nz * nz.log()).sum()) if nz.numel() else math.log(num_classes)
        return cls(loss=entropy, accuracy=float(p.max()) if p.numel() else 1.0 / num_classes, num_classes=num_classes)

    @property
    def accuracy_margin(self) -> float:
        """How far above chance accuracy still counts as "at chance" (a few binomial
        standard deviations of a small training set, at least 2 points)."""
        return max(0.02, 0.25 / self.num_classes)


def is_stalled(epoch: int, train_loss: float, train_acc: float, chance: Chance) -> bool:
    """True when, after :data:`STALL_MIN_EPOCHS` epochs, the training loss is no better
    than chance (within :data:`STALL_LOSS_MARGIN`) and accuracy is at chance level.

    A loss far *above* chance with chance accuracy (weights blown up by a huge LR, but
    still finite) is stuck too; a non-finite loss is the divergence check's job.
    """
    if epoch < STALL_MIN_EPOCHS or not math.isfinite(train_loss):
        return False
    loss_at_chance = train_loss >= chance.loss * (1.0 - STALL_LOSS_MARGIN)
    acc_at_chance = train_acc <= chance.accuracy + chance.accuracy_margin
    return loss_at_chance and acc_at_chance


def stall_message(epoch: int, train_loss: float, train_acc: float, chance: Chance, lr: float, run_dir: Path, stopping: bool) -> str:
    """One line: what the detector saw and what to do about it."""
    head = (
        f"training is stuck at chance after epoch {epoch}: train loss {train_loss:.4f} vs {chance.loss:.4f} "
        f"for guessing, train accuracy {train_acc:.1%} vs chance {chance.accuracy:.1%}. "
        f"The learning rate (peak {lr:g}) is most likely too high: try --lr {lr / 10:g} or run "
        "`cifarlab lr-find` to pick one"
    )
    if stopping:
        return head + (
            f". Stopped; the last checkpoint is in {run_dir / 'checkpoints'}. To train on regardless, "
            f"resume with `cifarlab train --out {run_dir} --resume --no-stop-on-stall`"
        )
    return "warning: " + head + " (continuing: --no-stop-on-stall)"


def divergence_message(step: int, lr: float, run_dir: Path, last_good: Path | None) -> str:
    """One line for a NaN/inf loss: where, at which LR, what survived, what to try."""
    kept = (
        f"the last good checkpoint {last_good} is kept (nothing with non-finite values was saved)"
        if last_good is not None
        else "no checkpoint had been written yet, and none with non-finite values was"
    )
    return (
        f"training diverged: the loss became NaN/inf at step {step} (learning rate {lr:.4g}); {kept}. "
        f"Try a lower --lr (e.g. {lr / 10:.3g}) or run `cifarlab lr-find` to choose one"
    )


# ------------------------------------------------------------------ finite values


def nonfinite_entries(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating-point tensors that hold NaN or inf (one host sync in all)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    named = [(k, v) for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if not named:
        return []
    # One reduction per device, then one copy each: a save on CUDA costs a sync or two,
    # not one per tensor.
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, v) in enumerate(named):
        by_device.setdefault(v.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
        bad.extend(i for i, ok in zip(idx, flags.tolist()) if not ok)
    return [named[i][0] for i in sorted(bad)]


# --------------------------------------------------------------------- disk space

#: Checkpoint files a run needs room for: last.pt, best.pt, and the temporary copy that
#: an atomic save writes next to the file it replaces.
CHECKPOINTS_NEEDED = 3


def estimate_checkpoint_bytes(model: nn.Module) -> int:
    """Rough size of one checkpoint: weights + buffers, x3 for optimizer state (SGD
    momentum or Adam's two moments) and slack, plus 1 MiB of metadata and history."""
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    buffers = sum(t.numel() * t.element_size() for t in model.buffers())
    return 3 * (weights + buffers) + (1 << 20)


def check_disk_space(run_dir: Path, model: nn.Module, existing: Iterable[Path] = ()) -> None:
    """Refuse to start a run whose directory cannot hold :data:`CHECKPOINTS_NEEDED` checkpoints.

    ``existing`` checkpoint files (when resuming) already occupy their share. Finding
    out at the first save, an epoch into the run, would waste that epoch.
    """
    need = CHECKPOINTS_NEEDED * estimate_checkpoint_bytes(model)
    need -= sum(p.stat().st_size for p in existing if p.is_file())
    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the run directory may not exist yet: ask its filesystem
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell (exotic filesystem): the save itself will report a full disk
    if free < need:
        raise CifarlabError(
            f"not enough disk space for run directory {run_dir}: {_mb(free)} free, need about {_mb(need)} "
            f"for {CHECKPOINTS_NEEDED} checkpoints of this model (last, best and the temporary copy of a save); "
            "free some space or pass --out on another disk"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
