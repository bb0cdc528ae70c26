"""``--resume``: find the run to continue, decide its config, check it can continue here."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

from cifarlab.checkpoint import TrainingCheckpoint, read_checkpoint
from cifarlab.config import TrainConfig, config_from_dict
from cifarlab.errors import CifarlabError
from cifarlab.rundir import RunDir, default_run_dir, latest_run_dir

#: Keys that --resume may change: how long, where and how verbosely the run continues
#: (tensorboard included), its robustness knobs, and the report's CAM method (cam). Anything else would silently make it
#: a different run. ("data": the same dataset may live at another path on another
#: machine; the classes are checked against the checkpoint's.)
RESUMABLE_KEYS = frozenset({"epochs", "device", "log_every", "save_every_steps", "stop_on_stall", "compile", "data", "tensorboard", "cam"})


def open_run(
    cfg: TrainConfig, resume: bool, overrides: Mapping[str, Any] | None
) -> tuple[RunDir, TrainConfig, TrainingCheckpoint | None]:
    """The run directory, the config the run trains with, and the checkpoint it resumes
    from (None for a new run). Fails before any data is read."""
    if resume:
        root = Path(cfg.out) if cfg.out else latest_run_dir(cfg)
        if root is None or not RunDir(root).holds_run():
            where = root or f"runs/{cfg.preset or cfg.model}-*"
            raise CifarlabError(f"--resume: no checkpoint to resume from in {where} (expected checkpoints/last.pt)")
        run_dir = RunDir(root)
        ckpt = TrainingCheckpoint.from_dict(read_checkpoint(run_dir.last))
        stored = config_from_dict({k: v for k, v in ckpt.config.items() if v is not None})
        cfg = resume_config(stored, cfg, overrides, root)
    else:
        run_dir = RunDir(Path(cfg.out) if cfg.out else default_run_dir(cfg))
        if run_dir.holds_run():
            raise CifarlabError(
                f"{run_dir.root} already holds a run (checkpoints/last.pt); continue it with "
                f"`cifarlab train --out {shlex.quote(str(run_dir.root))} --resume`, or pass another --out"
            )
        ckpt = None
    return run_dir, replace(cfg, out=str(run_dir.root)), ckpt


def resume_config(stored: TrainConfig, cfg: TrainConfig, overrides: Mapping[str, Any] | None, run_dir: Path) -> TrainConfig:
    """The config a resumed run continues with: the stored one plus the allowed changes.

    ``overrides`` are the keys the user set explicitly (CLI flags); None (a library call)
    keeps the old contract of taking epochs, device and log_every from ``cfg``.
    """
    if overrides is None:
        changes = {"epochs": cfg.epochs, "device": cfg.device, "log_every": cfg.log_every}
    else:
        changes = {k: getattr(cfg, k) for k in overrides if k in RESUMABLE_KEYS}
        refused = sorted(
            k for k in overrides if k not in RESUMABLE_KEYS and k != "out" and getattr(stored, k, None) != getattr(cfg, k, None)
        )
        if refused:
            flags = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise CifarlabError(
                f"--resume continues the run stored in {run_dir}, but {flags} would change it; drop "
                f"{'that option' if len(refused) == 1 else 'those options'}, or start a new run with another --out"
            )
    epochs = changes.get("epochs", stored.epochs)
    if epochs != stored.epochs and stored.scheduler in ("onecycle", "cosine"):
        raise CifarlabError(
            f"--resume: this run's {stored.scheduler} schedule was planned for {stored.epochs} epochs "
            f"and cannot be stretched to {epochs}; resume without --epochs, or start a new run"
        )
    return replace(stored, **changes, out=str(run_dir))


def check_resume(ckpt: TrainingCheckpoint, classes, steps_per_epoch: int, world_size: int, log: Callable[[str], None]) -> int:
    """Validate that ``ckpt`` can be continued by this run; return its step within the epoch."""
    if list(classes) != ckpt.classes:
        raise CifarlabError(
            f"--resume: the data's classes {list(classes)[:5]} differ from the checkpoint's "
            f"{ckpt.classes[:5]}; pass the --data the run was trained on"
        )
    step = ckpt.step_in_epoch
    saved_world = ckpt.world_size
    saved_steps = int(ckpt.steps_per_epoch or steps_per_epoch)
    if step and (saved_world != world_size or saved_steps != steps_per_epoch):
        raise CifarlabError(
            f"--resume: the checkpoint was saved mid-epoch by {saved_world} process(es) with {saved_steps} steps per "
            f"epoch, but this run has {world_size} and {steps_per_epoch}; resume with the same number of processes "
            "and the same data"
        )
    if not 0 <= step < steps_per_epoch:
        raise CifarlabError(f"--resume: the checkpoint's step_in_epoch {step} is out of range; it is damaged")
    if saved_world != world_size:
        log(
            f"note: this run was trained by {saved_world} process(es) and continues on {world_size}: "
            "correct, but not bit for bit what the original setup would have produced"
        )
    return step
