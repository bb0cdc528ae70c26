"""The run directory: where a training run keeps everything, spelled in one place.

Layout::

    config.toml           resolved config (rerun with --config)
    metrics.jsonl         one JSON object per epoch
    log.txt               what was printed
    checkpoints/last.pt   after every epoch and every --save-every-steps steps (resume point)
    checkpoints/best.pt   best test accuracy so far
    model.safetensors     final weights, safe to share
    skipped_files.txt     with --skip-bad: the unreadable files left out
    tb/                   with --tensorboard: TensorBoard event files (cifarlab.tblog)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from torch import nn

from cifarlab.checkpoint import atomic_write
from cifarlab.config import TrainConfig, to_toml
from cifarlab.errors import CifarlabError
from cifarlab.guards import check_disk_space

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created until :meth:`prepare`)."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped_files.txt"

    def holds_run(self) -> bool:
        """Whether a run was started here (it has a checkpoint to resume from)."""
        return self.last.is_file()

    def prepare(self, cfg: TrainConfig, model: nn.Module, resuming: bool) -> None:
        """Check disk space, create the directory, drop temp files of killed saves, write config.toml."""
        check_disk_space(self.root, model, [self.last, self.best] if resuming else [])
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            # A save killed between writing its temp file and the rename leaves the temp file.
            for folder in (self.checkpoints, self.root):
                for stale in folder.glob(".*.tmp-*"):
                    stale.unlink(missing_ok=True)
            if not resuming:
                self.write_metrics([])
            self.config.write_text(to_toml(cfg), encoding="utf-8")
        except OSError as exc:
            raise CifarlabError(f"cannot write the run directory {self.root}: {exc.strerror or exc}") from None

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl with ``rows`` (atomically)."""
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(self.metrics, lambda f: f.write(text.encode("utf-8")))

    def append_metrics(self, row: dict) -> None:
        """Append one epoch's row to metrics.jsonl (an OSError is the caller's to report)."""
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def write_skipped(self, skipped) -> Path:
        """List the files --skip-bad left out (informational: a failure is ignored)."""
        try:
            self.skipped.write_text("".join(f"{p}\n" for p in skipped), encoding="utf-8")
        except OSError:
            pass
        return self.skipped


def default_run_dir(cfg: TrainConfig) -> Path:
    """runs/<preset or model>-<UTC timestamp>."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset or cfg.model}-{stamp}"


def latest_run_dir(cfg: TrainConfig) -> Path | None:
    """The newest runs/<preset or model>-* folder that has a last.pt to resume from."""
    candidates = sorted(Path("runs").glob(f"{cfg.preset or cfg.model}-*/{CHECKPOINTS}/{LAST}"))
    return candidates[-1].parent.parent if candidates else None


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    """The command that continues ``run_dir`` (a torchrun line for multi-process runs)."""
    out = shlex.quote(str(run_dir))
    if world_size <= 1:
        return f"cifarlab train --out {out} --resume"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    nodes = max(1, world_size // max(per_node, 1))
    launch = f"torchrun --nproc_per_node={per_node}" + (f" --nnodes={nodes} (plus your rendezvous options)" if nodes > 1 else "")
    return f"{launch} -m cifarlab train --out {out} --resume"


class RunLog:
    """Prints to the terminal and appends to ``log.txt``: one place for all run output.

    ``quiet`` (DDP ranks other than 0) prints and writes nothing. A failing append
    (full disk) is reported once and otherwise ignored: the log must not be the thing
    that kills a run; the next checkpoint save reports the disk problem properly.
    """

    def __init__(self, path: Path | None, stream: TextIO | None = None, quiet: bool = False):
        self.path = path
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self._write_failed = False

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        print(message, file=self.stream, flush=True)
        self.record(message)

    def record(self, message: str) -> None:
        """Append ``message`` to log.txt only (for what the CLI prints on stderr itself)."""
        if self.quiet or self.path is None:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                print(f"cifarlab: warning: cannot append to {self.path}: {exc.strerror}", file=sys.stderr, flush=True)
