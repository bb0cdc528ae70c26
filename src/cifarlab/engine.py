"""The training/evaluation step: one ``run_epoch`` for training, evaluation and plain
prediction, test-time augmentation, and the metrics read off collected logits.

Nothing here knows about files, configs or the CLI; ``train.py`` wires it up, with the
device and precision resolved by :mod:`cifarlab.runtime` and the optimizer and schedule
built by :mod:`cifarlab.optim`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.optim import SchedulerPlan
from cifarlab.progress import Progress
from cifarlab.runtime import Runtime

# -------------------------------------------------------------------------------- TTA


def predict_logits(model: nn.Module, x: torch.Tensor, tta: str = "none", pad: str = "reflect") -> torch.Tensor:
    """Logits for batch ``x`` (B,3,H,W), averaged over test-time augmentations.

    'flip' averages the image and its mirror; 'flip-translate' adds the mirror-pair of
    1-pixel translations (up-left and down-right), as the CIFAR speed-runs do (weights
    0.5 for the untranslated pair, 0.25 each for the translated pairs). ``pad`` is the
    translations' border: "reflect" (airbench's, and what the "translate" augmentation
    trains on) or "constant" (zeros). Reflection scored 0.04-0.18 points higher on three
    fast checkpoints (benchmarks/reference/tta_pad.py; raw output in
    benchmarks/results/2026-12-03-cpu-avx512-diagnose/tta_pad.jsonl).
    """
    if tta == "none":
        return model(x)
    logits = 0.5 * (model(x) + model(x.flip(-1)))
    if tta == "flip":
        return logits
    padded = F.pad(x, (1, 1, 1, 1), mode=pad)
    h, w = x.shape[-2:]
    up_left = padded[..., :h, :w]
    down_right = padded[..., 2:, 2:]
    shifted = 0.0
    for xs in (up_left, down_right):
        shifted = shifted + 0.5 * (model(xs) + model(xs.flip(-1)))
    return 0.5 * logits + 0.25 * shifted


# ---------------------------------------------------------------------------- epochs


@dataclass
class EpochResult:
    """What one pass over a loader produced. Tensors are on the CPU."""

    loss: float  # nan for a pass without a loss function (plain prediction)
    accuracy: float
    n: int
    seconds: float
    steps: int
    lrs: list[float] = field(default_factory=list)  # LR of the first param group per step
    logits: torch.Tensor | None = None  # (n, classes) float32, when collect=True
    targets: torch.Tensor | None = None  # (n,) int64, when collect=True


StepHook = Callable[[int, dict], None]


class NonFiniteLossError(RuntimeError):
    """Raised by run_epoch when the training loss becomes NaN/inf."""

    def __init__(self, step: int, lr: float):
        super().__init__(f"loss became non-finite at step {step} (lr {lr:.3g})")
        self.step = step
        self.lr = lr


@dataclass
class Trainer:
    """What makes :func:`run_epoch` train: the optimizer and what steps with it.

    ``check_finite=False`` leaves the NaN/inf check to the caller: under DDP one rank
    must not raise alone while the others wait in the next all-reduce.
    """

    optimizer: torch.optim.Optimizer
    scheduler: SchedulerPlan | None = None
    scaler: torch.amp.GradScaler | None = None
    check_finite: bool = True

    def step(self, loss: torch.Tensor) -> float:
        """Backward pass, optimizer step, per-step schedule; returns the LR the step used."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        plan = self.scheduler
        if plan is not None and plan.per_step and plan.scheduler is not None:
            plan.scheduler.step()
        return lr


class _Tally:
    """Running loss/correct sums of one pass, kept on the device (no per-step host sync)."""

    def __init__(self, device: torch.device, collect: bool):
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.n = 0
        self.collect = collect
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor | None) -> None:
        batch = y.shape[0]
        self.n += batch
        if loss is not None:
            self.loss_sum += loss.detach().double() * batch
        self.correct += (logits.argmax(1) == y).sum()
        if self.collect:
            self.logits.append(logits.detach().float().cpu())
            self.targets.append(y.cpu())

    def result(self, seconds: float, steps: int, lrs: list[float], has_loss: bool) -> EpochResult:
        n = max(self.n, 1)
        return EpochResult(
            loss=self.loss_sum.item() / n if has_loss else math.nan,
            accuracy=self.correct.item() / n,
            n=self.n,
            seconds=seconds,
            steps=steps,
            lrs=lrs,
            logits=torch.cat(self.logits) if self.collect and self.logits else None,
            targets=torch.cat(self.targets) if self.collect and self.targets else None,
        )


def run_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    trainer: Trainer | None = None,
    tta: str = "none",
    collect: bool = False,
    progress: Progress | None = None,
    log_every: int = 20,
    on_step: StepHook | None = None,
    step_offset: int = 0,
) -> EpochResult:
    """One pass over ``batches``: trains with ``trainer``, else evaluates (inference mode).

    Without ``loss_fn`` (evaluation only) no loss is computed: plain prediction, whose
    labels may be placeholders. Loss and correct counts accumulate on the device; the
    host reads them only when ``progress`` shows them and at the end, so CUDA steps never
    wait on the host. ``on_step(global_step, info)`` runs after each training step
    (checkpointing, signal handling); ``info`` holds this step's ``loss`` and ``lr`` and
    the epoch's running ``loss_sum``/``correct`` device tensors and sample count ``n``
    (for a mid-epoch checkpoint). ``step_offset`` is the global step of the first batch.
    """
    train = trainer is not None
    if train and loss_fn is None:
        raise ValueError("training needs a loss function")
    model.train(train)
    tally = _Tally(runtime.device, collect)
    lrs: list[float] = []
    start = time.perf_counter()
    step, loss = 0, None
    # Non-finite checks need a host sync; on CPU that is free, on CUDA do it per log interval.
    check_every = (1 if runtime.device.type == "cpu" else log_every) if train and trainer.check_finite else 0
    try:
        with contextlib.nullcontext() if train else torch.inference_mode():
            for step, (x, y) in enumerate(batches, start=1):
                with runtime.autocast():
                    logits = model(x) if train else predict_logits(model, x, tta)
                    loss = loss_fn(logits.float(), y) if loss_fn is not None else None
                if train:
                    lrs.append(trainer.step(loss))
                    if check_every and step % check_every == 0 and not torch.isfinite(loss):
                        raise NonFiniteLossError(step_offset + step, lrs[-1])
                tally.add(logits, y, loss)
                if progress is not None:
                    progress.update(step, tally.n, tally.loss_sum, tally.correct, lrs[-1] if train else None)
                if train and on_step is not None:
                    info = {"loss": loss, "lr": lrs[-1], "loss_sum": tally.loss_sum, "correct": tally.correct, "n": tally.n}
                    on_step(step_offset + step, info)
    finally:
        if progress is not None:
            progress.close()
    if check_every and step and not torch.isfinite(loss):
        raise NonFiniteLossError(step_offset + step, lrs[-1])
    return tally.result(time.perf_counter() - start, step, lrs, has_loss=loss_fn is not None)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class from a confusion matrix (nan for a class with no samples)."""
    totals = confusion.sum(1)
    return [
        (confusion[i, i].item() / totals[i].item()) if totals[i] > 0 else math.nan
        for i in range(confusion.shape[0])
    ]

