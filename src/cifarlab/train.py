"""``fit(config)``: data → model → epochs → run directory (see :mod:`cifarlab.rundir`).

The CLI's ``train`` is a thin wrapper around it, and so is the notebook use
``cifarlab.train.fit(resolve_config(...))``. ``fit`` reads as the run's sequence: open
or resume the run directory, build a :class:`TrainingRun`, train its epochs, finish.
Everything a run needs between those steps lives on the ``TrainingRun``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import torch
from torch import nn

from cifarlab import __version__, distributed
from cifarlab.checkpoint import PartialEpoch, TrainingCheckpoint, export_safetensors, read_checkpoint, restore_rng_state, rng_state
from cifarlab.config import TrainConfig
from cifarlab.context import RunContext, build_context
from cifarlab.engine import EpochResult, NonFiniteLossError, Trainer, run_epoch
from cifarlab.errors import CifarlabError, TrainingInterrupted, TrainingStopped
from cifarlab.guards import Chance, StopSignals, divergence_message, is_stalled, signal_name, stall_message
from cifarlab.optim import Lookahead, make_optimizer, make_scheduler
from cifarlab.progress import Progress, progress_mode
from cifarlab.resume import check_resume, open_run
from cifarlab.rundir import RunDir, RunLog, resume_command
from cifarlab.runtime import resolve_device
from cifarlab.tblog import TensorBoardLog, require as require_tensorboard
from cifarlab.trainhooks import Interrupt, Saver, StepHook


@dataclass
class RunResult:
    """What ``fit`` returns."""

    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_acc: float = 0.0
    best_epoch: int = 0
    seconds: float = 0.0
    lrs: list[float] = field(default_factory=list)


@dataclass
class FinishedRun:
    """What ``fit``'s ``on_finish`` callback receives (on rank 0, checkpoints already written)."""

    run_dir: Path
    model: nn.Module  # the plain module (never DDP/compiled), on its device
    dataset: Any  # cifarlab.data.Dataset
    final_eval: EpochResult | None  # the last epoch's collected evaluation (None if none ran)
    epoch: int
    log: RunLog


OnFinish = Callable[[FinishedRun], None]


def fit(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool | None = None,
    stream: TextIO | None = None,
    resume_overrides: Mapping[str, Any] | None = None,
    on_finish: OnFinish | None = None,
) -> RunResult:
    """Train per ``cfg``; write the run directory; return the history and where it went.

    ``on_finish`` runs on rank 0 after the checkpoints and ``model.safetensors`` are
    written (the CLI writes the report there; a failing callback never loses the run).
    ``progress``: None shows a bar on a terminal and a plain line about every 30 s
    elsewhere; True/False force the bar/silence.

    ``resume`` continues ``<out>/checkpoints/last.pt`` exactly where it stopped, mid-epoch
    included, with the stored config; ``resume_overrides`` names the keys the user set
    explicitly (the CLI passes its flags) and only run length, device, logging and
    robustness keys may change. SIGINT/SIGTERM stop after the current step with a saved
    checkpoint (:class:`TrainingInterrupted`); a NaN loss or a run stuck at chance stops
    with advice (:class:`TrainingStopped`). Under torchrun every process calls fit();
    rank 0 prints and writes the files.
    """
    launched = time.perf_counter()
    run_dir, cfg, ckpt = open_run(cfg, resume, resume_overrides)
    require_tensorboard(cfg)  # a missing package fails here, before any data is read
    # Under torchrun every process runs this function; without it this is a no-op.
    dist = distributed.setup(resolve_device(cfg.device).type)
    run = TrainingRun(cfg, run_dir, dist, mode=progress_mode(progress), stream=stream, launched=launched, ckpt=ckpt)
    with StopSignals(notify=_signal_notice if dist.is_main else None) as signals:
        for epoch in range(run.start_epoch, cfg.epochs):
            run.train_epoch(epoch, signals)
    run.finish(on_finish)
    # Every rank leaves together. A rank that returned early destroyed its gloo process
    # group while rank 0 was still writing files, and two-process runs then died now
    # and then in that teardown ("terminate called without an active exception",
    # SIGABRT; benchmarks/ddp_teardown.py counts it).
    distributed.barrier()
    return run.result


class TrainingRun:
    """One training run between fit()'s steps: context, optimizer, progress, saver.

    Built on every rank; rank 0 alone prints and writes files, and every collective
    happens on all ranks at the same point of the sequence.
    """

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, dist: distributed.DistInfo, *, mode: str,
                 stream: TextIO | None, launched: float, ckpt: TrainingCheckpoint | None):
        self.cfg, self.run_dir, self.dist, self.mode = cfg, run_dir, dist, mode
        self.main = dist.is_main
        self.ctx: RunContext = build_context(cfg, progress=mode == "bar" and self.main, dist=dist)
        # Launch to data-on-device and model built; with a warm decode cache this is the
        # start-up cost a user waits for before the first step (import time excluded).
        self.ready_s = time.perf_counter() - launched
        self.launched = launched
        self.model = self.ctx.model
        self.ds = self.ctx.dataset
        _main_then_agree(dist, lambda: run_dir.prepare(cfg, self.model, resuming=ckpt is not None))
        self.log = RunLog(run_dir.log, stream, quiet=not self.main)
        self.env = self.ctx.runtime.environment()
        self._announce()
        self.tb = TensorBoardLog.for_run(cfg, run_dir.root, self.ds, main=self.main, resuming=ckpt is not None)
        self.steps_per_epoch = len(self.ctx.train_loader)
        if self.steps_per_epoch == 0:
            raise CifarlabError("no training batches: the training split is empty")
        self._build_optimization(self._peak_lr(resuming=ckpt is not None))
        self.result = RunResult(run_dir=run_dir.root)
        self.start_epoch = self.start_step = 0
        self.partial: PartialEpoch | None = None  # the resumed epoch's sums before the checkpoint
        self.elapsed_before = 0.0
        self.amp_skipped_total = 0
        if ckpt is not None:
            self._restore(ckpt)
        self.train_model = self._wrap_for_training()
        self.description = self._description()
        self.saver = Saver(run_dir, dist)
        self.chance = Chance.of_labels(self.ds.train.labels, len(self.ds.classes))
        self.final_eval: EpochResult | None = None
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ set-up

    def _announce(self) -> None:
        """The run's first log lines: where, what data, which model, which device."""
        cfg, ds, rt, dist = self.cfg, self.ds, self.ctx.runtime, self.dist
        data_words = "SYNTHETIC data (procedurally generated, not CIFAR-10)" if ds.synthetic else f"{ds.name} data at {ds.root}"
        self.log(f"cifarlab {__version__} | run dir {self.run_dir.root}")
        self.log(
            f"{data_words}: {len(ds.train)} train / {len(ds.test)} {ds.eval_split} images"
            + (" (held out of train; the test split is not used)" if ds.eval_split != "test" else "")
            + f", {len(ds.classes)} classes | "
            f"model {cfg.model} ({cfg.norm} norm, {sum(p.numel() for p in self.model.parameters()):,} params) | "
            f"device {self.env['device']} ({self.env['device_name']}), precision {rt.precision}"
            + (", channels_last" if rt.channels_last else "")
            + (", small-map convs as matmuls" if rt.gemm_convs else "")
            + f" | ready in {self.ready_s:.1f}s"
            + (f" | {dist.world_size} processes ({dist.backend}), {cfg.batch_size // dist.world_size} images each per step" if dist.enabled else "")
        )
        from cifarlab.data import ResizeSchedule

        resized = ResizeSchedule.parse(cfg.progressive_resize).describe(cfg.epochs)
        if resized:
            self.log(f"progressive resize: {resized}, the rest at full size")
        skipped = getattr(ds, "skipped", ())
        if skipped:
            listed = self.run_dir.write_skipped(skipped) if self.main else None
            self.log(f"warning: --skip-bad: training without {len(skipped)} unreadable file(s); list in {listed}")

    def _peak_lr(self, resuming: bool) -> float:
        """The config's LR, or with ``lr = "auto"`` the LR finder's suggestion."""
        if self.cfg.lr != "auto":
            return float(self.cfg.lr)
        from cifarlab.lr_finder import auto_lr

        # The sweep trains copies and restores every RNG: the run below is unaffected.
        # Under DDP rank 0 sweeps alone and the others take its answer: every rank must
        # train with the same LR.
        total = self.cfg.epochs * self.steps_per_epoch
        lr = auto_lr(self.ctx, self.run_dir.root, self.log, total_steps=total, reuse=resuming, progress=self.mode == "bar") if self.main else 0.0
        return distributed.all_reduce_max([lr])[0]

    def _build_optimization(self, lr: float) -> None:
        """Optimizer, schedule, GradScaler, lookahead and losses for peak LR ``lr``."""
        cfg, total = self.cfg, self.cfg.epochs * self.steps_per_epoch
        self.lr = lr
        self.optimizer = make_optimizer(cfg, self.model, lr, self.ctx.runtime.device)
        self.plan = make_scheduler(cfg, self.optimizer, total)
        self.scaler = torch.amp.GradScaler(self.ctx.runtime.device.type) if self.ctx.runtime.precision == "fp16" else None
        # Built from the freshly initialised model; a resume overwrites its slow weights.
        self.lookahead = Lookahead(self.model, total_steps=total) if cfg.lookahead else None
        self.trainer = Trainer(self.optimizer, self.plan, self.scaler, check_finite=not self.dist.enabled)
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()

    def _restore(self, ckpt: TrainingCheckpoint) -> None:
        """Continue from ``ckpt``: weights, optimizer states, progress and every RNG."""
        self.start_step = check_resume(ckpt, self.ds.classes, self.steps_per_epoch, self.dist.world_size, self.log)
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(ckpt.optimizer)
        if self.plan.scheduler is not None and ckpt.scheduler is not None:
            self.plan.scheduler.load_state_dict(ckpt.scheduler)
        if self.scaler is not None and ckpt.scaler:
            self.scaler.load_state_dict(ckpt.scaler)
        if self.lookahead is not None:
            self.lookahead.load_state_dict(ckpt.lookahead)
        # Last, after everything above that may draw random numbers (model init).
        restore_rng_state(ckpt.rng)
        self.start_epoch = ckpt.epoch
        self.partial = ckpt.partial if self.start_step else None
        r = self.result
        r.history, r.lrs, r.best_acc, r.best_epoch = list(ckpt.history), list(ckpt.lrs), ckpt.best_acc, ckpt.best_epoch
        self.elapsed_before = ckpt.seconds
        self.amp_skipped_total = ckpt.amp_skipped_steps
        if self.main:
            # Rows written after the checkpoint (a kill between the metrics append and the
            # save) would otherwise appear twice once those epochs are trained again.
            self.run_dir.write_metrics(r.history)
        spe = self.steps_per_epoch
        at = f"epoch {self.start_epoch}" if not self.start_step else f"step {self.start_step}/{spe} of epoch {self.start_epoch + 1}"
        self.log(f"resuming from {self.run_dir.last} after {at}")
        if self.start_epoch >= self.cfg.epochs:
            self.log(f"nothing to do: the run already finished {self.start_epoch} of {self.cfg.epochs} epochs")

    def _wrap_for_training(self) -> nn.Module:
        """DDP and torch.compile around the model for the training step only."""
        train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Gradients are averaged over ranks in the backward pass; rank 0's BatchNorm
            # statistics are broadcast at each forward. Checkpoints use the plain module.
            dev = self.ctx.runtime.device
            train_model = DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        # Compile only the training forward/backward; checkpoints, evaluation and explanations
        # keep using the plain module (state_dict keys without the _orig_mod prefix).
        return torch.compile(train_model) if self.cfg.compile else train_model

    def _description(self) -> dict[str, Any]:
        """The part of every checkpoint that is fixed for the run."""
        ds = self.ds
        return {
            "model": self.model.spec,
            "classes": list(ds.classes),
            "mean": list(ds.mean),
            "std": list(ds.std),
            "dataset": {"name": ds.name, "root": ds.root, "synthetic": ds.synthetic},
            "config": self.cfg.to_dict(),
            "versions": {"torch": str(torch.__version__), "cifarlab": __version__},
            "environment": self.env,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world_size,
        }

    def checkpoint(self, epochs_done: int, step_in_epoch: int, metrics: dict | None, partial: PartialEpoch | None) -> dict:
        """The checkpoint payload as of now. Called on rank 0 only, inside the save: no collectives."""
        r = self.result
        return TrainingCheckpoint(
            description=self.description,
            state_dict=self.model.state_dict(),
            epoch=epochs_done,
            step_in_epoch=step_in_epoch,
            partial=partial,
            metrics=metrics,
            best_acc=r.best_acc,
            best_epoch=r.best_epoch,
            history=r.history,
            lrs=r.lrs,
            seconds=self.elapsed_before + time.perf_counter() - self.t0,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.plan.scheduler.state_dict() if self.plan.scheduler is not None else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            lookahead=self.lookahead.state_dict() if self.lookahead is not None else None,
            amp_skipped_steps=self.amp_skipped_total,
            rng=rng_state(),
        ).to_dict()

    # ------------------------------------------------------------------ epochs

    def train_epoch(self, epoch: int, signals: StopSignals) -> None:
        """Train, evaluate, record, save and check one epoch."""
        resumed = epoch == self.start_epoch
        first = self.start_step if resumed else 0
        prior = self.partial if resumed else None
        hook = self._step_hook(epoch, signals, prior)
        tr = self._train_steps(epoch, first, hook)
        # Exact epoch totals: this rank's sums, summed over ranks, plus the part of the
        # epoch trained before a mid-epoch resume.
        sums = distributed.all_reduce_sum([tr.loss * tr.n, round(tr.accuracy * tr.n), tr.n])
        totals = (prior or PartialEpoch()).add(sums[0], sums[1], sums[2], tr.lrs, tr.seconds, hook.amp_skipped())
        self.amp_skipped_total += totals.amp_skipped
        last_epoch = epoch + 1 == self.cfg.epochs
        if last_epoch and self.lookahead is not None:
            self.lookahead.finish()  # evaluate and save the slow weights the run ends on
        te = self._evaluate(epoch)
        if self.plan.on_metric:  # config validation guarantees an evaluation every epoch here
            self.plan.scheduler.step(te.loss)
        row = self._record(epoch, totals, te)
        improved = te is not None and te.accuracy > self.result.best_acc
        if improved:
            self.result.best_acc, self.result.best_epoch = te.accuracy, epoch + 1
        self.saver.save(
            lambda: self.checkpoint(epoch + 1, 0, row, None),
            best=improved,
            step=(epoch + 1) * self.steps_per_epoch,
            lr=row["lr"],
        )
        self.tb.epoch(row, totals.lrs, first_step=epoch * self.steps_per_epoch)  # after the save: what the checkpoint holds
        self._check_stop(epoch, row, signals)

    def _step_hook(self, epoch: int, signals: StopSignals, prior: PartialEpoch | None) -> StepHook:
        history = self.result.history
        return StepHook(
            epoch=epoch,
            steps_per_epoch=self.steps_per_epoch,
            save_every=self.cfg.save_every_steps,
            # Agreeing across ranks costs a host sync: every step on CPU, where it is
            # free, per log interval on GPUs.
            sync_every=1 if self.ctx.runtime.device.type == "cpu" else self.cfg.log_every,
            signals=signals,
            saver=self.saver,
            scaler=self.scaler,
            lookahead=self.lookahead,
            prior=prior,
            payload=lambda k, part: self.checkpoint(epoch, k, history[-1] if history else None, part),
        )

    def _train_steps(self, epoch: int, first: int, hook: StepHook) -> EpochResult:
        """The epoch's training steps from step ``first``; stops become their user-facing errors."""
        spe, cfg = self.steps_per_epoch, self.cfg
        self.ctx.train_loader.set_epoch(epoch)
        progress = Progress(self.mode if self.main else "off", spe - first, f"epoch {epoch + 1}/{cfg.epochs}", log_every=cfg.log_every)
        try:
            return run_epoch(
                self.train_model,
                self.ctx.train_loader.iter_from(first),
                self.ctx.runtime,
                loss_fn=self.train_loss,
                trainer=self.trainer,
                progress=progress,
                log_every=cfg.log_every,
                on_step=hook,
                step_offset=epoch * spe + first,
            )
        except NonFiniteLossError as exc:
            message = divergence_message(exc.step, exc.lr, self.run_dir.root, self.saver.last_good)
            self.log.record(message)
            raise TrainingStopped(message) from None
        except Interrupt as stop:
            where = f"at step {stop.step_in_epoch}/{spe} of epoch {epoch + 1}"
            raise TrainingInterrupted(self._interrupted(stop.signum, where), stop.signum) from None

    def _evaluate(self, epoch: int) -> EpochResult | None:
        """The test (or holdout) evaluation, on the epochs that have one."""
        cfg = self.cfg
        last_epoch = epoch + 1 == cfg.epochs
        if not (last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            return None
        # TTA multiplies evaluation cost (6 passes for flip-translate); per-epoch numbers only
        # track progress, so pay for it once, on the final epoch that the run reports.
        tta = cfg.tta if last_epoch else "none"
        # Every rank evaluates with rank 0's BatchNorm statistics: the ones the checkpoint holds.
        distributed.broadcast_buffers(self.model)
        # The final epoch's logits feed the report's per-class numbers and galleries.
        te = run_epoch(self.model, self.ctx.test_loader, self.ctx.runtime, loss_fn=self.eval_loss, tta=tta, collect=last_epoch)
        if self.dist.enabled:
            te = _reduce_eval(te, len(self.ds.test))
        if te.logits is not None:
            self.final_eval = te
        return te

    def _record(self, epoch: int, tr: PartialEpoch, te: EpochResult | None) -> dict:
        """The epoch's metrics row: into the history, metrics.jsonl and the log."""
        cfg, ds = self.cfg, self.ds
        tr_loss, tr_acc = tr.loss_sum / max(tr.n, 1), tr.correct / max(tr.n, 1)
        self.result.lrs.extend(tr.lrs)
        row = {
            "epoch": epoch + 1,
            "train_loss": tr_loss,
            "train_acc": tr_acc,
            # None on epochs that eval_every skips
            "test_loss": te.loss if te else None,
            "test_acc": te.accuracy if te else None,
            "lr": tr.lrs[-1] if tr.lrs else self.optimizer.param_groups[0]["lr"],
            "seconds": round(tr.seconds + (te.seconds if te else 0.0), 3),
            "train_seconds": round(tr.seconds, 3),
            # wall seconds since fit() started, data loading included (time-to-accuracy)
            "elapsed": round(self.elapsed_before + time.perf_counter() - self.launched, 3),
            "tta": cfg.tta if epoch + 1 == cfg.epochs else "none",
        }
        if ds.eval_split != "test":  # test_* columns then hold held-out-train numbers
            row["eval_split"] = ds.eval_split
        if self.scaler is not None:
            row["amp_skipped_steps"] = tr.amp_skipped
        if ds.synthetic:
            row["data"] = "synthetic"
        self.result.history.append(row)
        if self.main:
            try:
                self.run_dir.append_metrics(row)
            except OSError as exc:
                raise CifarlabError(self.saver.disk_message(exc, self.run_dir.metrics)) from None
        self.log(
            f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {tr_loss:.4f} acc {tr_acc:6.2%}  "
            + (f"{ds.eval_split} loss {te.loss:.4f} acc {te.accuracy:6.2%}  " if te else f"({ds.eval_split}: not evaluated)  ")
            + f"lr {row['lr']:.3g}  {row['seconds']:.1f}s"
        )
        if self.scaler is not None and tr.amp_skipped:
            self.log(
                f"fp16: the GradScaler skipped {tr.amp_skipped} of {self.steps_per_epoch} steps this epoch "
                "(inf/NaN gradients; a few early on are normal while it finds its scale)"
            )
        return row

    def _check_stop(self, epoch: int, row: dict, signals: StopSignals) -> None:
        """Stop a run stuck at chance, or honour a signal that arrived during evaluation."""
        cfg = self.cfg
        tr_loss, tr_acc = row["train_loss"], row["train_acc"]
        if is_stalled(epoch + 1, tr_loss, tr_acc, self.chance):
            message = stall_message(epoch + 1, tr_loss, tr_acc, self.chance, self.lr, self.run_dir.root, stopping=cfg.stop_on_stall)
            if cfg.stop_on_stall:
                self.log.record(message)
                raise TrainingStopped(message)
            self.log(message)
        # A signal that arrived during evaluation: the epoch's checkpoint is saved, stop here.
        signum = int(distributed.all_reduce_max([signals.signum])[0])
        if signum and epoch + 1 < cfg.epochs:
            raise TrainingInterrupted(self._interrupted(signum, f"after epoch {epoch + 1}"), signum)

    def _interrupted(self, signum: int, where: str) -> str:
        message = (
            f"interrupted by {signal_name(signum)} {where}; checkpoint saved to {self.run_dir.last}. "
            f"Resume with: {resume_command(self.run_dir.root, self.dist.world_size)}"
        )
        self.log.record(message)
        return message

    # ------------------------------------------------------------------ the end

    def finish(self, on_finish: OnFinish | None) -> None:
        """Export the final weights, log the summary, hand the run to ``on_finish`` (rank 0)."""
        r, ds = self.result, self.ds
        r.seconds = self.elapsed_before + time.perf_counter() - self.t0
        if self.main:
            final = read_checkpoint(self.run_dir.last)
            try:
                export_safetensors(self.run_dir.weights, final)
            except OSError as exc:
                raise CifarlabError(
                    f"cannot write {self.run_dir.weights}: {exc.strerror or exc}; the checkpoints are intact. "
                    f"Free some space, then export it with: {resume_command(self.run_dir.root, self.dist.world_size)}"
                ) from None
        if r.history:
            last = r.history[-1]
            self.log(
                f"done in {r.seconds:.1f}s: final {ds.eval_split} acc {last['test_acc']:.2%}, "
                f"best {r.best_acc:.2%} at epoch {r.best_epoch}"
                + (" (SYNTHETIC data)" if ds.synthetic else "")
            )
        self.log(f"run saved to {self.run_dir.root}")
        self.tb.close()
        if self.main and on_finish is not None:
            on_finish(FinishedRun(self.run_dir.root, self.model, ds, self.final_eval, self.cfg.epochs, self.log))


def _main_then_agree(dist: distributed.DistInfo, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0; if it raised, make every rank raise (nobody waits forever)."""
    error: CifarlabError | None = None
    if dist.is_main:
        try:
            fn()
        except CifarlabError as exc:
            error = exc
    if dist.enabled and distributed.all_reduce_max([1.0 if error else 0.0])[0] and error is None:
        error = CifarlabError("stopped because rank 0 failed (its message says why)")
    if error is not None:
        raise error


def _signal_notice(message: str) -> None:
    print(f"cifarlab: {message}", file=sys.stderr, flush=True)


def _reduce_eval(te: EpochResult, total: int) -> EpochResult:
    """Whole-test-set metrics from every rank's strided slice (and its logits, if collected)."""
    loss_sum, correct, n = distributed.all_reduce_sum([te.loss * te.n, round(te.accuracy * te.n), te.n])
    logits, targets = te.logits, te.targets
    if logits is not None:
        logits = distributed.gather_strided(logits, total)
        targets = distributed.gather_strided(targets, total)
    return replace(te, loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), n=int(n), logits=logits, targets=targets)
