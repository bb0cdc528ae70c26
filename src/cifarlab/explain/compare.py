"""``cifarlab explain --compare-cams``: every CAM method on the same test images, in one table.

The images are those the galleries explain (most confidently misclassified and correct),
each explained for its predicted class. Per method: the seconds its maps took, the
deletion check of :mod:`cifarlab.explain.faithfulness` (masking the top CAM pixels vs
random blobs) and ROAD's most/least-relevant-first drops, so a user can see which method
points at what their own model uses, and at what cost.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cifarlab.config import CAM_METHODS
from cifarlab.explain.cams import cam_maps, cam_title, check_method
from cifarlab.explain.faithfulness import ROAD_REMOVED, Faithfulness, Road, deletion_check, road_check

COMPARE_FILE = "compare_cams.json"


@dataclass(frozen=True)
class CamScore:
    """One method's row of the comparison."""

    method: str
    seconds: float  # computing the maps (not the checks)
    deletion: Faithfulness
    road: Road

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON row."""
        d, r = self.deletion, self.road
        return {
            "method": self.method,
            "title": cam_title(self.method),
            "seconds": self.seconds,
            "cam_drop": d.cam_drop,
            "random_drop": d.random_drop,
            "cam_wins": d.cam_wins,
            "road_morf_drop": r.morf_mean,
            "road_lerf_drop": r.lerf_mean,
            "road_morf": list(r.morf_drop),
            "road_lerf": list(r.lerf_drop),
        }


@dataclass(frozen=True)
class CamComparison:
    """All methods on the same images and layer."""

    layer: str
    n_images: int
    fraction: float  # share of pixels the deletion check masks
    removed: tuple[float, ...]  # shares of pixels ROAD removes
    rows: list[CamScore]

    def to_dict(self) -> dict[str, Any]:
        """What ``compare_cams.json`` holds."""
        return {
            "layer": self.layer,
            "n_images": self.n_images,
            "fraction": self.fraction,
            "road_removed": list(self.removed),
            "methods": [row.to_dict() for row in self.rows],
        }

    def table(self) -> str:
        """The comparison as aligned text, one method per line."""
        head = f"{'method':<11} {'seconds':>8} {'cam_drop':>9} {'rnd_drop':>9} {'cam_wins':>8} {'MoRF':>7} {'LeRF':>7}"
        lines = [head]
        for row in self.rows:
            d, r = row.deletion, row.road
            lines.append(
                f"{row.method:<11} {row.seconds:>8.2f} {d.cam_drop:>9.3f} {d.random_drop:>9.3f} "
                f"{d.cam_wins:>8.0%} {r.morf_mean:>7.3f} {r.lerf_mean:>7.3f}"
            )
        removed = ", ".join(f"{s:.0%}" for s in self.removed)
        lines.append(
            f"Drops of p(predicted) on {self.n_images} images, layer {self.layer}. cam_drop / rnd_drop: the top "
            f"{self.fraction:.0%} CAM pixels / random blobs masked;\nMoRF / LeRF: ROAD removing {removed} of the pixels, "
            "most / least relevant first (mean). Faithful maps: cam_drop > rnd_drop, large MoRF, small LeRF."
        )
        return "\n".join(lines)


def compare_cams(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    *,
    layer: str | None = None,
    methods: Sequence[str] = CAM_METHODS,
    fraction: float = 0.2,
    removed: tuple[float, ...] = ROAD_REMOVED,
) -> CamComparison:
    """Each of ``methods`` on normalised ``images`` (on the model's device), explaining ``classes``."""
    for method in methods:
        check_method(method)
    if images.shape[0]:
        # Untimed warm-up: the first call pays the library's import and kernel set-up,
        # which is no cost of the method that happens to come first.
        cam_maps(model, images[:1], classes[:1], layer, "gradcam")
    rows = []
    name = layer or ""
    for method in methods:
        start = time.perf_counter()
        cams, name = cam_maps(model, images, classes, layer, method)
        seconds = time.perf_counter() - start
        rows.append(
            CamScore(
                method,
                round(seconds, 3),
                deletion_check(model, images, cams, classes, fraction),
                road_check(model, images, cams, classes, removed),
            )
        )
    return CamComparison(name, int(images.shape[0]), fraction, tuple(removed), rows)


def compare_checkpoint(
    checkpoint: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    n_misclassified: int = 20,
    n_correct: int = 10,
    layer: str | None = None,
    methods: Sequence[str] = CAM_METHODS,
) -> CamComparison:
    """Load a checkpoint, predict its test split and compare the methods on the gallery images."""
    from cifarlab.evaluate import load_for_inference, predict_split
    from cifarlab.explain.galleries import normalised_inputs
    from cifarlab.explain.layers import resolve_layer, unwrap
    from cifarlab.explain.select import select_examples

    run = load_for_inference(str(checkpoint), overrides)
    model = unwrap(run.model)
    resolve_layer(model, layer)  # a bad --layer fails before the test split is predicted
    res = predict_split(run)
    mis = select_examples(res.logits, res.targets, n_misclassified, correct=False)
    cor = select_examples(res.logits, res.targets, n_correct, correct=True)
    idx = torch.cat([mis.indices, cor.indices])
    device = next(model.parameters()).device
    x = normalised_inputs(run.dataset.test.images[idx], run.info["mean"], run.info["std"], device, run.runtime.channels_last)
    return compare_cams(model, x, torch.cat([mis.preds, cor.preds]), layer=layer, methods=methods)


def write_comparison(comparison: CamComparison, out_dir: str | Path) -> Path:
    """Write ``compare_cams.json`` into ``out_dir``; returns its path."""
    path = Path(out_dir) / COMPARE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(comparison.to_dict(), indent=1) + "\n", encoding="utf-8")
    return path
