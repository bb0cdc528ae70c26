"""The Run tab's content: a run's headline numbers and its report figures."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn


def headline(ckpt: Mapping[str, Any], history: Sequence[Mapping[str, Any]], model: nn.Module, runtime, dataset,
             metrics: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The numbers the app's Run tab and an exported model card show (plain JSON values).

    ``accuracy`` is this model's accuracy on the evaluation split as the demo loaded it;
    ``best_acc``/``last_acc`` come from the training history (None where the source has none).
    """
    cfg = ckpt.get("config", {})
    evaluated = [r for r in history if r.get("test_acc") is not None]
    best = max(evaluated, key=lambda r: r["test_acc"]) if evaluated else None
    stored_best = ckpt.get("best") or {}
    last_row = evaluated[-1] if evaluated else (ckpt.get("metrics") or {})
    seconds = ckpt.get("seconds", sum(float(r.get("seconds", 0.0)) for r in history) if history else None)
    return {
        "run": name,
        "model": ckpt["model"]["name"],
        "params": int(sum(p.numel() for p in model.parameters())),
        "preset": cfg.get("preset"),
        "epochs": int(ckpt.get("epoch", len(history))),
        "best_acc": _num(best["test_acc"] if best else stored_best.get("test_acc")),
        "best_epoch": int(best["epoch"]) if best else stored_best.get("epoch"),
        "last_acc": _num(last_row.get("test_acc")),
        "accuracy": float(metrics["accuracy"]),
        "n_eval": int(metrics["n"]),
        "wall_seconds": _num(seconds),
        "eval_split": getattr(dataset, "eval_split", "test"),
        "data": data_words(dataset),
        "tta": cfg.get("tta", "none"),
        "precision": runtime.precision,
        "device": str(runtime.device),
    }


def data_words(dataset) -> str:
    """What the model was evaluated on, in words (the report's phrasing)."""
    if dataset.synthetic:
        return "SYNTHETIC data (procedurally generated patterns, not CIFAR-10)"
    return f"{dataset.name} data at {dataset.root}"


def _num(value) -> float | None:
    return None if value is None else float(value)


def run_figures(history: Sequence[Mapping[str, Any]], lrs: Sequence[float], metrics: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG bytes of the report's 'curves' (only with a history), 'per_class' and 'confusion' figures."""
    from cifarlab.explain.overlay import figure_png
    from cifarlab.report import plots

    out = {}
    if history:
        out["curves"] = figure_png(plots.curves_figure(list(history), list(lrs)))
    classes = list(metrics["per_class"])
    out["per_class"] = figure_png(plots.per_class_figure(classes, list(metrics["per_class"].values())))
    out["confusion"] = figure_png(plots.confusion_figure(metrics["confusion"], classes))
    return out
