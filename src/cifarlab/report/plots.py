"""Report figures (matplotlib ``Figure`` objects on the Agg canvas; no pyplot state).

Every function returns a Figure; ``cifarlab.explain.overlay.figure_png`` renders it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

_DPI = 100


def _figure(width: float, height: float, **kw):
    """A constrained-layout Figure of ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained", **kw)


def curves_figure(history: Sequence[Mapping], lrs: Sequence[float]):
    """Train/test loss and accuracy per epoch, and the LR of every optimizer step."""
    fig = _figure(12, 3.4)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in history]
    for key, ax, label in (("loss", ax_loss, "loss"), ("acc", ax_acc, "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", ms=3, label="train")
        ax.plot(epochs, [_or_nan(r.get(f"test_{key}")) for r in history], "s-", ms=3, label="test")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    evaluated = [r for r in history if r.get("test_acc") is not None]
    if evaluated:
        best = max(evaluated, key=lambda r: r["test_acc"])
        ax_acc.annotate(
            f"best {best['test_acc']:.2%}",
            (best["epoch"], best["test_acc"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    if lrs:
        ax_lr.plot(range(1, len(lrs) + 1), lrs, lw=1.2, color="C2")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate per step")
    ax_lr.grid(True, alpha=0.3)
    return fig


def per_class_figure(classes: Sequence[str], accuracy: Sequence[float]):
    """Horizontal bars of per-class test accuracy, with the mean as a line."""
    n = len(classes)
    fig = _figure(6.4, min(24.0, max(2.0, 0.28 * n + 0.9)))  # capped: 100 classes still fit a page
    ax = fig.add_subplot()
    vals = [0.0 if math.isnan(a) else a for a in accuracy]
    y = np.arange(n)
    bars = ax.barh(y, vals, color=["C3" if v == min(vals) else "C0" for v in vals])
    ax.set_yticks(y, list(classes), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.axvline(float(np.nanmean(accuracy)) if n else 0.0, color="0.3", ls="--", lw=1, label="mean")
    for bar, v in zip(bars, vals):
        ax.text(v + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.1%}", va="center", fontsize=7)
    ax.set_xlabel("test accuracy")
    ax.set_title("per-class accuracy")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str]):
    """Row-normalised confusion matrix heat map (rows = actual), counts written in the cells."""
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = min(14.0, max(4.0, 0.5 * n + 2.0))
    fig = _figure(size + 0.8, size)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    tick = 8 if n <= 20 else max(3, 8 - n // 20)
    ax.set_xticks(range(n), list(classes), rotation=45, ha="right", fontsize=tick)
    ax.set_yticks(range(n), list(classes), fontsize=tick)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix (row-normalised; counts in cells)")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def augmentation_figure(canvas: np.ndarray, spec, views: int):
    """The augmentation grid of ``cifarlab.data.preview.augmentation_grid`` (rows: training
    images; columns: the original, then ``views`` random draws), with the spec as title."""
    fig = _figure(canvas.shape[1] / _DPI + 0.3, canvas.shape[0] / _DPI + 0.5)
    ax = fig.add_subplot()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"augment = {spec}: original, then {views} random draws", fontsize=9)
    return fig


def compare_curves_figure(runs: Sequence[tuple[str, Sequence[Mapping]]]):
    """Test accuracy and loss per epoch of several runs overlaid (train accuracy dashed)."""
    fig = _figure(12, 3.8)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (name, history) in enumerate(runs):
        ep = [r["epoch"] for r in history]
        color = f"C{i % 10}"
        ax_acc.plot(ep, [_or_nan(r.get("test_acc")) for r in history], ".-", color=color, label=f"{name} test")
        ax_acc.plot(ep, [r["train_acc"] for r in history], "--", color=color, lw=0.9, label=f"{name} train")
        ax_loss.plot(ep, [_or_nan(r.get("test_loss")) for r in history], ".-", color=color, label=f"{name} test")
    for ax, title in ((ax_acc, "accuracy (train dashed)"), (ax_loss, "test loss")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=7)
    return fig


def compare_per_class_figure(classes: Sequence[str], runs: Sequence[tuple[str, Sequence[float]]]):
    """Grouped bars: per-class test accuracy of each run side by side."""
    n, k = len(classes), max(1, len(runs))
    fig = _figure(max(6.4, 0.55 * n * k / 2 + 2), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / k
    x = np.arange(n)
    for i, (name, acc) in enumerate(runs):
        ax.bar(x - 0.4 + width * (i + 0.5), [0 if math.isnan(a) else a for a in acc], width, label=name, color=f"C{i % 10}")
    ax.set_xticks(x, list(classes), rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("per-class accuracy")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _or_nan(value):
    """Epochs that ``eval_every`` skipped have no test numbers: plot them as gaps."""
    return float("nan") if value is None else value
