"""Evaluate a checkpoint on a test split: accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from cifarlab.checkpoint import build_model, read_checkpoint
from cifarlab.config import TrainConfig, config_from_dict, validate_mapping
from cifarlab import context
from cifarlab.engine import EpochResult, confusion_matrix, per_class_accuracy, run_epoch
from cifarlab.errors import CifarlabError
from cifarlab.metrics import classification_report, most_confused, normalise_rows
from cifarlab.runtime import Runtime


@dataclass
class LoadedRun:
    """A checkpoint rebuilt for inference: model on its device plus the data it was trained on."""

    model: nn.Module
    info: dict[str, Any]
    cfg: TrainConfig
    runtime: Runtime
    dataset: Any


def load_for_inference(checkpoint: str, overrides: dict[str, Any] | None = None, load_data: bool = True) -> LoadedRun:
    """Rebuild model and (optionally) data from a checkpoint; ``overrides`` replace config keys
    such as data, dataset, limit_test, device, eval_batch_size, tta."""
    ckpt = read_checkpoint(checkpoint)
    stored = {k: v for k, v in ckpt.get("config", {}).items() if v is not None}
    cfg = config_from_dict({**stored, **validate_mapping(overrides or {}, "command line")})
    runtime = Runtime.resolve(cfg, training=False)
    model = runtime.prepare(build_model(ckpt))
    ds = None
    if load_data:
        ds = context.load_data(cfg)
        if list(ds.classes) != list(ckpt["classes"]):
            raise CifarlabError(
                f"the data's classes {list(ds.classes)[:5]}... do not match the checkpoint's "
                f"{list(ckpt['classes'])[:5]}...; pass the --data/--dataset the model was trained on"
            )
    info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler", "scaler")}
    return LoadedRun(model, info, cfg, runtime, ds)


def run_from_model(model: nn.Module, info: Mapping[str, Any], cfg: TrainConfig, dataset) -> LoadedRun:
    """A :class:`LoadedRun` around a model already in memory (the end of ``fit``): device
    and memory format are read off the model, the precision resolved from the config."""
    return LoadedRun(model, dict(info), cfg, Runtime.of_model(model, cfg.precision), dataset)


def test_loader(run: LoadedRun):
    """Unshuffled, unaugmented loader over the test split, normalised with the checkpoint's stats."""
    from cifarlab.data import DeviceLoader

    return DeviceLoader(
        run.dataset.test,
        run.cfg.eval_batch_size,
        device=run.runtime.device,
        mean=tuple(run.info["mean"]),
        std=tuple(run.info["std"]),
        shuffle=False,
        channels_last=run.runtime.channels_last,
    )


def predict_split(run: LoadedRun) -> EpochResult:
    """Logits and targets for the whole test split (with the config's TTA)."""
    return run_epoch(run.model, test_loader(run), run.runtime, loss_fn=nn.CrossEntropyLoss(), tta=run.cfg.tta, collect=True)


def metrics_from_logits(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """{"accuracy", "per_class": {class: acc}, "confusion": [[...]]} from collected logits."""
    preds = logits.argmax(1)
    cm = confusion_matrix(preds, targets, len(classes))
    per_class = per_class_accuracy(cm)
    return {
        "accuracy": (preds == targets).float().mean().item(),
        "per_class": {c: a for c, a in zip(classes, per_class)},
        "confusion": cm.tolist(),
    }


def evaluate_checkpoint(checkpoint: str, overrides: dict[str, Any] | None = None, min_count: int = 1) -> dict[str, Any]:
    """Evaluate a checkpoint on its test split; returns the metrics dict plus n and dataset.

    ``most_confused`` lists the pairs confused at least ``min_count`` times.
    """
    run = load_for_inference(checkpoint, overrides)
    res = predict_split(run)
    classes = list(run.info["classes"])
    out = metrics_from_logits(res.logits, res.targets, classes)
    out["report"] = classification_report(out["confusion"], classes)
    out["confusion_normalized"] = normalise_rows(out["confusion"])
    out["most_confused"] = [list(t) for t in most_confused(out["confusion"], classes, min_count)]
    out["n"] = res.n
    out["loss"] = res.loss
    out["dataset"] = "synthetic" if run.dataset.synthetic else run.dataset.name
    return out


def format_metrics(m: dict[str, Any]) -> str:
    """Human-readable accuracy, classification report, most confused pairs and confusion matrix."""
    classes = list(m["per_class"])
    width = max(12, max(len(c) for c in classes))
    lines = [f"test accuracy: {m['accuracy']:.2%} on {m['n']} images ({m['dataset']})", ""]
    lines.append(f"  {'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}   (recall = per-class accuracy)")
    report = m["report"]
    rows = [(c, report["per_class"][c]) for c in classes] + [("macro avg", report["macro"]), ("weighted avg", report["weighted"])]
    for name, r in rows:
        lines.append(f"  {name:<{width}} {r['precision']:9.2%} {r['recall']:7.2%} {r['f1']:7.2%} {r['support']:>8d}")
    pairs = m["most_confused"][:10]
    if pairs:
        lines += ["", "most confused (actual -> predicted: count):"]
        lines += [f"  {a} -> {p}: {n}" for a, p, n in pairs]
    lines += ["", "confusion matrix (rows = true, columns = predicted):"]
    short = [c[:6] for c in classes]
    lines.append(" " * (width + 2) + " ".join(f"{s:>6}" for s in short))
    for c, row in zip(classes, m["confusion"]):
        lines.append(f"  {c:<{width}}" + " ".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)
