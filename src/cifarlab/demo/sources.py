"""What ``cifarlab demo SOURCE`` can open, and how: a run directory, a checkpoint file, or
an exported demo folder.

A run directory or a checkpoint brings its test split (from the run's config, or from
``--data`` when the dataset has moved) and the split's logits: the ones training stored in
``predictions.npz`` when they belong to this checkpoint, else one pass over the split.
An exported folder (``model.safetensors`` + ``demo_data.npz``) brings everything
precomputed and needs no dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab.demo.store import DEMO_DATA_FILE, DemoData, read_demo_data
from cifarlab.errors import CifarlabError
from cifarlab.rundir import CHECKPOINTS, RunDir
from cifarlab.runtime import Runtime


@dataclass
class Source:
    """A model ready for inference plus either its test data and logits or stored demo data."""

    model: nn.Module
    runtime: Runtime
    cfg: Any  # TrainConfig
    ckpt: dict[str, Any]  # the checkpoint's description (no weights)
    weights_path: Path
    run_dir: Path | None = None
    dataset: Any = None
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    stored: DemoData | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


def open_source(source: str | Path, *, device: str | None = None, data: str | None = None) -> Source:
    """Load ``source`` for the demo on ``device`` (default: the CPU); one-line CifarlabError
    for a missing or unreadable checkpoint, a folder that is none of the three, or missing data."""
    path = Path(source)
    overrides = {"device": device or "cpu", **({"data": str(data)} if data else {})}
    if path.is_dir():
        rd = RunDir(path)
        if rd.last.is_file():
            return _from_checkpoint(rd.last, path, overrides)
        if rd.weights.is_file() and (path / DEMO_DATA_FILE).is_file():
            return _from_export(path, overrides)
        if rd.weights.is_file():
            return _from_checkpoint(rd.weights, path, overrides)
        raise CifarlabError(
            f"{path} is not a finished run directory (no {CHECKPOINTS}/last.pt) nor an exported demo folder "
            f"(model.safetensors + {DEMO_DATA_FILE})"
        )
    if not path.exists():
        raise CifarlabError(f"{path}: no such run directory, checkpoint or exported demo folder")
    return _from_checkpoint(path, _owning_run_dir(path), overrides)


def _owning_run_dir(ckpt_path: Path) -> Path | None:
    """The run directory a checkpoint file sits in (``RUN/checkpoints/x.pt``, ``RUN/model.safetensors``), if any."""
    folder = ckpt_path.parent.parent if ckpt_path.parent.name == CHECKPOINTS else ckpt_path.parent
    return folder if RunDir(folder).last.is_file() or RunDir(folder).config.is_file() else None


def _from_checkpoint(ckpt_path: Path, run_dir: Path | None, overrides: dict[str, Any]) -> Source:
    from cifarlab.evaluate import load_for_inference

    run = load_for_inference(str(ckpt_path), overrides)
    logits, targets = _test_logits(run, run_dir)
    history, lrs = _history(run.info, run_dir)
    return Source(
        model=run.model,
        runtime=run.runtime,
        cfg=run.cfg,
        ckpt=run.info,
        weights_path=ckpt_path,
        run_dir=run_dir,
        dataset=run.dataset,
        logits=logits,
        targets=targets,
        history=history,
        lrs=lrs,
    )


def _from_export(folder: Path, overrides: dict[str, Any]) -> Source:
    from cifarlab.evaluate import load_for_inference

    weights = RunDir(folder).weights
    run = load_for_inference(str(weights), overrides, load_data=False)
    stored = read_demo_data(folder / DEMO_DATA_FILE)
    if stored.classes != list(run.info["classes"]):
        raise CifarlabError(f"{folder / DEMO_DATA_FILE} was made for other classes than {weights.name}; export the folder again")
    return Source(model=run.model, runtime=run.runtime, cfg=run.cfg, ckpt=run.info, weights_path=weights, stored=stored)


def _test_logits(run, run_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's logits: stored by training when they belong to this checkpoint, else predicted now.

    Nothing is written back: the demo leaves the run directory as it found it.
    """
    from cifarlab.evaluate import predict_split
    from cifarlab.report.predictions import load_predictions

    if run_dir is not None and "epoch" in run.info:
        stored = load_predictions(run_dir, int(run.info["epoch"]), len(run.dataset.test))
        if stored is not None:
            return stored
    res = predict_split(run)
    return res.logits, res.targets


def _history(info: dict[str, Any], run_dir: Path | None) -> tuple[list[dict[str, Any]], list[float]]:
    """Per-epoch rows and per-step LRs: the checkpoint's own, or (exported weights carry
    none) those of the run's last.pt when it is the same epoch."""
    if "history" in info:
        return list(info["history"]), list(info.get("lrs", []))
    if run_dir is None or not RunDir(run_dir).last.is_file():
        return [], []
    from cifarlab.checkpoint import read_checkpoint

    try:
        last = read_checkpoint(RunDir(run_dir).last)
    except CifarlabError:
        return [], []  # the weights loaded fine; a bad last.pt only costs the curves
    if int(last.get("epoch", -1)) != int(info.get("epoch", -2)):
        return [], []
    return list(last.get("history", [])), list(last.get("lrs", []))
