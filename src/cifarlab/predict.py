"""``cifarlab predict IMAGE...``: classify arbitrary image files with a checkpoint.

Files are decoded and resized by the very code that builds image-folder datasets
(``cifarlab.data.sources.decode_images``: any mode -> RGB, antialiased bilinear resize
to 32x32), so a file predicts exactly as it would if it were part of a test folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from cifarlab.errors import CifarlabError


@dataclass
class Prediction:
    """Top-k classes of one file, and the CAM overlay written for it (if asked)."""

    path: str
    top: list[tuple[str, float]]  # (class, probability), most likely first
    cam_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """``cat.png: cat 87.1%, dog 9.0%, deer 1.2%``"""
        return f"{self.path}: " + ", ".join(f"{c} {p:.1%}" for c, p in self.top)


def predict_files(
    paths: Sequence[str | Path],
    checkpoint: str | Path,
    *,
    device: str | None = None,
    topk: int = 3,
    explain: bool = False,
    out: str | Path | None = None,
    layer: str | None = None,
    cam: str = "gradcam",
) -> list[Prediction]:
    """Top-``topk`` predictions for each image file; with ``explain``, write ``<stem>.cam.png``
    (CAM method ``cam``, see ``config.CAM_METHODS``) next to each image (or into ``out``)."""
    from cifarlab.data import DeviceLoader, Split
    from cifarlab.data.sources import decode_images
    from cifarlab.engine import run_epoch
    from cifarlab.evaluate import load_for_inference

    if not paths:
        raise CifarlabError("predict: give at least one image file")
    if topk < 1:
        raise CifarlabError(f"--top must be >= 1, got {topk}")
    names = [str(p) for p in paths]
    for p in names:
        if not Path(p).is_file():
            raise CifarlabError(f"image not found: {p}")
    if explain:
        from cifarlab.explain.cams import check_method

        check_method(cam)
    run = load_for_inference(str(checkpoint), {"device": device} if device else None, load_data=False)
    if explain:
        from cifarlab.explain.layers import resolve_layer

        resolve_layer(run.model, layer)  # a bad --layer fails before any work
    images, bad = decode_images(names)
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        raise CifarlabError(f"{len(bad)} file(s) could not be read as images: {listed}")
    classes = list(run.info["classes"])
    mean, std = tuple(run.info["mean"]), tuple(run.info["std"])
    loader = DeviceLoader(
        Split(images, torch.zeros(len(names), dtype=torch.int64)),
        run.cfg.eval_batch_size,
        device=run.runtime.device,
        mean=mean,
        std=std,
        shuffle=False,
        channels_last=run.runtime.channels_last,
    )
    # Plain prediction with the checkpoint's TTA: no loss, and the placeholder labels'
    # accuracy is ignored.
    res = run_epoch(run.model, loader, run.runtime, tta=run.cfg.tta, collect=True)
    probs = res.logits.softmax(1)
    k = min(topk, len(classes))
    top_p, top_i = probs.topk(k, dim=1)
    preds = [
        Prediction(path=p, top=[(classes[int(i)], float(q)) for q, i in zip(top_p[n], top_i[n])])
        for n, p in enumerate(names)
    ]
    if explain:
        _write_cams(run, loader, preds, top_i[:, 0], out, layer, cam, mean, std)
    return preds


def _write_cams(run, loader, preds: list[Prediction], targets: torch.Tensor, out, layer, cam, mean, std) -> None:
    from cifarlab.explain.cams import cam_maps, cam_title
    from cifarlab.explain.overlay import denormalise, prediction_figure, save_png

    x = torch.cat([xb for xb, _ in loader])
    cams, name = cam_maps(run.model, x, targets, layer, cam)
    pictures = denormalise(x, mean, std)
    used: set[Path] = set()
    for n, pred in enumerate(preds):
        src = Path(pred.path)
        dest_dir = Path(out) if out else src.parent
        dest = dest_dir / f"{src.stem}.cam.png"
        k = 1
        while dest in used:  # a.png and a.jpg, or same names from several folders into --out
            k += 1
            dest = dest_dir / f"{src.stem}-{k}.cam.png"
        used.add(dest)
        lines = [f"{c} {p:.1%}" for c, p in pred.top]
        fig = prediction_figure(pictures[n], cams[n].numpy(), lines, f"{src.name} ({cam_title(cam)}, layer {name})", cam_title(cam))
        pred.cam_path = str(save_png(fig, dest))
        pred.extra["layer"] = name
        pred.extra["method"] = cam
