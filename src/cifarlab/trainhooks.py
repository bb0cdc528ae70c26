"""What a training run does between steps so it never loses work: the checkpoint saver
(rank 0 writes, every rank learns the outcome) and the step hook (mid-epoch saves, stop
signals, NaN agreement across ranks, GradScaler skip counting, lookahead)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from cifarlab import _faults, distributed
from cifarlab.checkpoint import NonFiniteStateError, PartialEpoch, save_checkpoint
from cifarlab.engine import NonFiniteLossError
from cifarlab.errors import CifarlabError, TrainingStopped
from cifarlab.guards import StopSignals, divergence_message
from cifarlab.optim import Lookahead
from cifarlab.rundir import RunDir, resume_command


class Interrupt(Exception):
    """Raised by the step hook after the interrupt checkpoint is written."""

    def __init__(self, signum: int, step_in_epoch: int):
        super().__init__(signum)
        self.signum = signum
        self.step_in_epoch = step_in_epoch


class Saver:
    """Writes the run's checkpoints: rank 0 writes, every rank learns whether that worked.

    Never writes non-finite weights (save_checkpoint checks) and turns a full disk into
    a one-line error that says what survived; the atomic write keeps the old file.
    """

    def __init__(self, run_dir: RunDir, dist: distributed.DistInfo):
        self.run_dir = run_dir
        self.dist = dist
        self.last_good: Path | None = run_dir.last if run_dir.last.is_file() else None

    def save(self, make_payload: Callable[[], dict], *, step: int, lr: float, best: bool = False) -> None:
        """Write last.pt (and best.pt) from ``make_payload()``; a collective under DDP."""
        error: CifarlabError | None = None
        if self.dist.is_main:
            try:
                data = make_payload()
                # Write the new last.pt before best.pt: a crash in between leaves both loadable.
                save_checkpoint(self.run_dir.last, data)
                self.last_good = self.run_dir.last
                if best:
                    save_checkpoint(self.run_dir.best, data)
            except NonFiniteStateError:
                error = TrainingStopped(divergence_message(step, lr, self.run_dir.root, self.last_good))
            except OSError as exc:
                error = CifarlabError(self.disk_message(exc, self.run_dir.checkpoints))
        if self.dist.enabled and distributed.all_reduce_max([1.0 if error else 0.0])[0] and error is None:
            error = CifarlabError("stopped because rank 0 could not write a checkpoint (its message says why)")
        if error is not None:
            raise error

    def disk_message(self, exc: OSError, where: Path) -> str:
        """One line for a failed write: what failed, what survived, how to continue."""
        if self.last_good is not None:
            tail = (
                f"the previous checkpoint {self.last_good} is intact. Free some space, then resume with: "
                f"{resume_command(self.run_dir.root, self.dist.world_size)}"
            )
        else:
            tail = "no checkpoint had been written yet. Free some space and start the run again"
        return f"cannot write to {where}: {exc.strerror or exc}; {tail}"


class AmpSkips:
    """Counts the steps a GradScaler skipped (inf/NaN gradients) without a per-step sync.

    Its scale drops exactly when it skips a step: compare device tensors each step,
    read the count once per epoch.
    """

    def __init__(self, scaler: Any):
        self.scaler = scaler
        self._skipped: torch.Tensor | None = None
        self._prev_scale: torch.Tensor | None = None
        self._initial_scale = 0.0
        current = getattr(scaler, "_scale", None)
        if current is not None:
            self._prev_scale = current.detach().clone()
        else:
            self._initial_scale = float(scaler.get_scale())  # no sync before the first step

    def after_step(self) -> None:
        scale = getattr(self.scaler, "_scale", None)
        if scale is None:
            return
        if self._prev_scale is None:
            self._prev_scale = torch.full_like(scale, self._initial_scale)
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=scale.device)
        self._skipped += (scale < self._prev_scale).sum()
        self._prev_scale.copy_(scale)

    def count(self) -> int:
        """Steps skipped so far."""
        return int(self._skipped.item()) if self._skipped is not None else 0


class StepHook:
    """run_epoch's ``on_step`` in training: fault-injection points, GradScaler skip
    counting, the DDP agreement (non-finite loss, stop signal), mid-epoch checkpoints,
    graceful stop.

    Everything except the agreement is host-side bookkeeping; the agreement and the
    saves happen on steps that every rank computes identically, so collectives match.
    ``payload(step_in_epoch, partial)`` builds the mid-epoch checkpoint.
    """

    def __init__(
        self,
        *,
        epoch: int,
        steps_per_epoch: int,
        save_every: int,
        sync_every: int,
        signals: StopSignals,
        saver: Saver,
        scaler: Any,
        prior: PartialEpoch | None,
        payload: Callable[[int, PartialEpoch], dict],
        lookahead: Lookahead | None = None,
    ):
        self.epoch = epoch
        self.spe = steps_per_epoch
        self.save_every = save_every
        self.sync_every = max(1, sync_every)
        self.signals = signals
        self.dist = saver.dist
        self.saver = saver
        self.lookahead = lookahead
        self.prior = prior or PartialEpoch()
        self.payload = payload
        self.lrs: list[float] = []
        self.t0 = time.perf_counter()
        self.amp = AmpSkips(scaler) if scaler is not None else None

    def amp_skipped(self) -> int:
        """Steps the GradScaler skipped in this epoch so far (0 without fp16)."""
        return self.amp.count() if self.amp is not None else 0

    def __call__(self, global_step: int, info: dict) -> None:
        if self.lookahead is not None:  # part of the step: before any checkpoint of it
            self.lookahead.after_step(global_step)
        _faults.at_step(global_step)
        self.lrs.append(info["lr"])
        if self.amp is not None:
            self.amp.after_step()
        k = global_step - self.epoch * self.spe  # steps done in this epoch
        last = k == self.spe
        save_due = bool(self.save_every) and k % self.save_every == 0 and not last
        signum = self.signals.signum
        if self.dist.enabled:
            if not (save_due or last or k % self.sync_every == 0):
                return
            signum = self._agree(global_step, info, signum)
        if last or not (save_due or signum):
            return  # the epoch end evaluates, saves and then honours a pending signal
        sums = distributed.all_reduce_sum([float(info["loss_sum"]), float(info["correct"]), float(info["n"])])
        seconds = time.perf_counter() - self.t0
        part = self.prior.add(sums[0], int(sums[1]), int(sums[2]), self.lrs, seconds, self.amp_skipped())
        self.saver.save(lambda: self.payload(k, part), step=global_step, lr=info["lr"])
        if signum:
            raise Interrupt(signum, k)

    def _agree(self, global_step: int, info: dict, signum: int) -> int:
        """All ranks: stop together on a non-finite loss anywhere; take the highest pending signal."""
        bad = 0.0 if bool(torch.isfinite(info["loss"])) else 1.0
        bad, agreed = distributed.all_reduce_max([bad, float(signum)])
        if bad:
            raise NonFiniteLossError(global_step, info["lr"])
        return int(agreed)
