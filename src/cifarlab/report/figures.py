"""The report's figures of one run, rendered to PNG (the drawing itself is in ``plots``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cifarlab.report.render import Figure_


def report_figures(ckpt: Mapping[str, Any], cfg, dataset, metrics: Mapping[str, Any], expl, run_dir: Path) -> list[Figure_]:
    """Every figure of the report, in page order: LR finder (if it ran), curves, per-class
    accuracy, confusion matrix, augmented samples and the Grad-CAM galleries."""
    from cifarlab.data import AugmentSpec
    from cifarlab.data.preview import VIEWS, augmentation_grid, sample_images
    from cifarlab.explain.overlay import figure_png
    from cifarlab.report import plots

    out = []
    lr_png = run_dir / "lr_find.png"
    if lr_png.is_file():
        out.append(Figure_("lr_find", "loss against learning rate, suggestion marked", lr_png.read_bytes()))
    history = list(ckpt.get("history", []))
    out.append(Figure_("curves", "loss and accuracy per epoch, LR per step", figure_png(plots.curves_figure(history, ckpt.get("lrs", [])))))
    classes = list(metrics["per_class"])
    out.append(Figure_("per_class", "per-class test accuracy", figure_png(plots.per_class_figure(classes, list(metrics["per_class"].values())))))
    out.append(Figure_("confusion", "confusion matrix", figure_png(plots.confusion_figure(metrics["confusion"], classes))))
    spec = AugmentSpec.parse(cfg.augment)
    grid = augmentation_grid(sample_images(dataset.train), spec, ckpt["mean"], ckpt["std"], seed=cfg.seed)
    aug = plots.augmentation_figure(grid, spec, VIEWS)
    out.append(Figure_("augmentations", "augmented training samples", figure_png(aug)))
    for g in expl.galleries():
        out.append(Figure_(g.kind, f"{g.kind} test images with Grad-CAM", figure_png(g.figure(expl.classes))))
    return out
