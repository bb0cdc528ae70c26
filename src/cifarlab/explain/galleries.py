"""The ``explain`` pipeline: pick test images, CAM them, check the maps, save it all.

Used by ``cifarlab explain`` (from a checkpoint) and by the report at the end of
training (with the model and predictions already in memory).

Output files (``write_explanation``)::

    misclassified.png   gallery: image | CAM of the predicted class | CAM of the actual class
    correct.png         gallery: image | CAM of the (correctly) predicted class
    top_losses.png      gallery: image | CAM predicted | CAM actual, highest loss first
    explain.json        chosen test indices, classes, probabilities, losses, layer, method, faithfulness
                        (deletion check per gallery, with its ROAD drops under "road")
    cams.npz            indices, images (uint8 N,H,W,3), cam_pred, cam_true (float32 N,H,W),
                        preds, targets, probs, gallery (name per row), layer, method
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cifarlab.explain.faithfulness import Faithfulness, Road, deletion_check, road_check
from cifarlab.explain.cams import cam_maps, check_method
from cifarlab.explain.layers import resolve_layer, unwrap
from cifarlab.explain.overlay import GalleryItem, denormalise, gallery_figure, overlay, save_png
from cifarlab.explain.select import Selection, select_examples, select_top_losses

GALLERIES = ("misclassified", "correct", "top_losses")


@dataclass
class Gallery:
    """One set of explained test images (most confident first)."""

    kind: str  # one of GALLERIES
    selection: Selection
    images: np.ndarray  # uint8 (n, H, W, 3), de-normalised
    cam_pred: np.ndarray  # float32 (n, H, W) in [0, 1]
    cam_true: np.ndarray  # float32 (n, H, W) in [0, 1]; == cam_pred where the prediction is right
    faithfulness: Faithfulness
    road: Road  # ROAD most/least-relevant-first drops of the predicted class's maps

    def rows(self, classes: Sequence[str]) -> list[dict[str, Any]]:
        """One JSON-ready dict per image."""
        s = self.selection
        return [
            {
                "index": int(s.indices[i]),
                "actual": classes[int(s.targets[i])],
                "predicted": classes[int(s.preds[i])],
                "actual_id": int(s.targets[i]),
                "predicted_id": int(s.preds[i]),
                "prob": float(s.probs[i]),
                "actual_prob": float(s.true_probs[i]),
                "loss": float(s.losses[i]),
            }
            for i in range(len(s))
        ]

    def _caption(self, i: int, classes: Sequence[str]) -> tuple[str, str]:
        s = self.selection
        actual, pred = classes[int(s.targets[i])], classes[int(s.preds[i])]
        if self.kind == "top_losses":
            return (f"actual: {actual} / predicted: {pred}", f"loss {float(s.losses[i]):.2f} / p(actual) {float(s.true_probs[i]):.2f}")
        return (f"actual: {actual}", f"pred: {pred}  p={float(s.probs[i]):.2f}")

    def figure(self, classes: Sequence[str]):
        """The gallery as one captioned Figure."""
        n = len(self.selection)
        with_actual = self.kind != "correct"  # a correct image's actual-class map is its predicted one
        items = []
        for i in range(n):
            panels = [self.images[i], overlay(self.images[i], self.cam_pred[i])]
            if with_actual:
                panels.append(overlay(self.images[i], self.cam_true[i]))
            items.append(GalleryItem(panels, self._caption(i, classes)))
        titles = ["image", "CAM predicted", "CAM actual"] if with_actual else ["image", "CAM predicted"]
        title, accent = {
            "misclassified": (f"Most confidently misclassified test images ({n})", "#b00"),
            "correct": (f"Most confidently correct test images ({n})", "#070"),
            "top_losses": (f"Top losses: test images with the highest loss ({n})", "#a50"),
        }[self.kind]
        return gallery_figure(items, titles, title, per_row=5, accent=accent)


@dataclass
class Explanation:
    """The galleries of one model on one test split."""

    layer: str
    classes: list[str]
    misclassified: Gallery
    correct: Gallery
    top_losses: Gallery
    n_test: int
    accuracy: float
    method: str  # the CAM method (config.CAM_METHODS)

    def galleries(self) -> list[Gallery]:
        """Misclassified, correct, then top losses (the order of ``GALLERIES``)."""
        return [self.misclassified, self.correct, self.top_losses]

    def to_dict(self) -> dict[str, Any]:
        """What ``explain.json`` holds."""
        return {
            "layer": self.layer,
            "method": self.method,
            "classes": self.classes,
            "n_test": self.n_test,
            "accuracy": self.accuracy,
            **{g.kind: g.rows(self.classes) for g in self.galleries()},
            "faithfulness": {g.kind: {**g.faithfulness.to_dict(), "road": g.road.to_dict()} for g in self.galleries()},
        }


def normalised_inputs(images: torch.Tensor, mean, std, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (n,3,H,W) CPU images -> normalised float model inputs, exactly as the test loader makes them."""
    from cifarlab.data import DeviceLoader, Split

    n = images.shape[0]
    if n == 0:
        return torch.zeros((0, *images.shape[1:]), device=device)
    loader = DeviceLoader(
        Split(images, torch.zeros(n, dtype=torch.int64)),
        n,
        device=device,
        mean=tuple(mean),
        std=tuple(std),
        shuffle=False,
        channels_last=channels_last,
    )
    (x, _), = list(loader)
    return x


def _cam_requests(x: torch.Tensor, sels: Sequence[Selection]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and target classes of the one batched CAM call over all galleries: every image
    for its predicted class, then the misclassified ones again for their actual class (a
    correct image's actual-class map is its predicted-class map; see ``_split_cams``)."""
    preds = torch.cat([sel.preds for sel in sels])
    actual = torch.cat([sel.targets for sel in sels])
    wrong = preds != actual
    return torch.cat([x, x[wrong.to(x.device)]]), torch.cat([preds, actual[wrong]])


def _split_cams(cams: np.ndarray, sels: Sequence[Selection]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(predicted-class, actual-class) maps per gallery from the rows ``_cam_requests`` asked for."""
    n = sum(len(sel) for sel in sels)
    wrong = torch.cat([sel.preds != sel.targets for sel in sels]).numpy()
    pred_maps = cams[:n]
    true_maps = pred_maps.copy()
    true_maps[wrong] = cams[n:]
    out, start = [], 0
    for sel in sels:
        out.append((pred_maps[start : start + len(sel)], true_maps[start : start + len(sel)]))
        start += len(sel)
    return out


def explain_predictions(
    model: nn.Module,
    test_images: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    n_misclassified: int = 20,
    n_correct: int = 10,
    layer: str | None = None,
    channels_last: bool = False,
    n_top_losses: int = 10,
    cam: str = "gradcam",
) -> Explanation:
    """Select, CAM and faithfulness-check (deletion check, ROAD) test images given collected test logits.

    ``test_images`` is the uint8 (N, 3, H, W) test split the logits were computed on, in
    the same order. All CAMs (predicted and actual class, every gallery) come from the
    method ``cam`` in one batched call on the model's device.
    """
    check_method(cam)
    model = unwrap(model)
    device = next(model.parameters()).device
    sels = (
        select_examples(logits, targets, n_misclassified, correct=False),
        select_examples(logits, targets, n_correct, correct=True),
        select_top_losses(logits, targets, n_top_losses),
    )
    idx = torch.cat([sel.indices for sel in sels])
    x = normalised_inputs(test_images[idx], mean, std, device, channels_last)
    cam_x, cam_targets = _cam_requests(x, sels)
    if cam_x.shape[0]:
        cams, name = cam_maps(model, cam_x, cam_targets, layer, cam)
    else:
        name = resolve_layer(model, layer)[0]
        cams = torch.zeros(0, *x.shape[-2:])
    cams_np = cams.numpy().astype(np.float32)
    pictures = denormalise(x, mean, std)
    galleries = []
    start = 0
    for kind, sel, (cp, ct) in zip(GALLERIES, sels, _split_cams(cams_np, sels)):
        rows = slice(start, start + len(sel))
        start = rows.stop
        faith = deletion_check(model, x[rows], torch.from_numpy(cp), sel.preds)
        road = road_check(model, x[rows], torch.from_numpy(cp), sel.preds)  # all galleries: ~1-3 s on CPU for 40 32x32 images
        galleries.append(Gallery(kind, sel, pictures[rows], cp, ct, faith, road))
    preds = logits.argmax(1).cpu()
    return Explanation(
        layer=name,
        classes=list(classes),
        misclassified=galleries[0],
        correct=galleries[1],
        top_losses=galleries[2],
        n_test=int(targets.numel()),
        accuracy=float((preds == targets.cpu()).float().mean()) if targets.numel() else float("nan"),
        method=cam,
    )


def write_explanation(expl: Explanation, out_dir: str | Path, pngs: dict[str, bytes] | None = None) -> dict[str, Path]:
    """Save the galleries (PNG), ``explain.json`` and ``cams.npz`` into ``out_dir``.

    ``pngs`` maps gallery kind to an already rendered PNG (the report renders them anyway).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for g in expl.galleries():
        path = out_dir / f"{g.kind}.png"
        if pngs and g.kind in pngs:
            path.write_bytes(pngs[g.kind])
            paths[g.kind] = path
        else:
            paths[g.kind] = save_png(g.figure(expl.classes), path)
    paths["json"] = out_dir / "explain.json"
    paths["json"].write_text(json.dumps(expl.to_dict(), indent=1) + "\n", encoding="utf-8")
    paths["npz"] = out_dir / "cams.npz"
    gs = expl.galleries()
    np.savez_compressed(
        paths["npz"],
        indices=np.concatenate([g.selection.indices.numpy() for g in gs]).astype(np.int64),
        images=np.concatenate([g.images for g in gs]).astype(np.uint8),
        cam_pred=np.concatenate([g.cam_pred for g in gs]).astype(np.float32),
        cam_true=np.concatenate([g.cam_true for g in gs]).astype(np.float32),
        preds=np.concatenate([g.selection.preds.numpy() for g in gs]).astype(np.int64),
        targets=np.concatenate([g.selection.targets.numpy() for g in gs]).astype(np.int64),
        probs=np.concatenate([g.selection.probs.numpy() for g in gs]).astype(np.float32),
        gallery=np.array([g.kind for g in gs for _ in range(len(g.selection))], dtype="<U13"),
        classes=np.array(expl.classes, dtype=str),
        layer=np.array(expl.layer),
        method=np.array(expl.method),
    )
    return paths


def explain_checkpoint(
    checkpoint: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    n_misclassified: int = 20,
    n_correct: int = 10,
    layer: str | None = None,
    n_top_losses: int = 10,
    cam: str = "gradcam",
) -> Explanation:
    """Load a checkpoint and its test data, predict the split, explain (``cifarlab explain``)."""
    from cifarlab.evaluate import load_for_inference, predict_split

    check_method(cam)  # a bad --cam fails before the checkpoint loads
    run = load_for_inference(str(checkpoint), overrides)
    resolve_layer(run.model, layer)  # a bad --layer fails before the test split is predicted
    res = predict_split(run)
    return explain_predictions(
        run.model,
        run.dataset.test.images,
        res.logits,
        res.targets,
        classes=run.info["classes"],
        mean=run.info["mean"],
        std=run.info["std"],
        n_misclassified=n_misclassified,
        n_correct=n_correct,
        layer=layer,
        channels_last=run.runtime.channels_last,
        n_top_losses=n_top_losses,
        cam=cam,
    )


def default_explain_dir(checkpoint: str | Path) -> Path:
    """``RUN/explain`` for ``RUN/checkpoints/x.pt``, else ``explain-<stem>`` beside the file."""
    from cifarlab.rundir import CHECKPOINTS

    p = Path(checkpoint)
    if p.parent.name == CHECKPOINTS:
        return p.parent.parent / "explain"
    return p.parent / f"explain-{p.stem}"
