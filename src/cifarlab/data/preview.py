"""What training feeds the model, as one picture: a few training images, each followed by
random augmented draws of it.

The report draws this grid with a title (``report.plots.augmentation_figure``) and
``--tensorboard`` logs the same pixels at the start of a run, so both show exactly the
augmentation the run trains with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .augment import AugmentSpec, augment_batch
from .dataset import Split
from .loader import DeviceLoader

ROWS = 8
VIEWS = 6


def sample_images(train: Split, rows: int = ROWS) -> torch.Tensor:
    """The first training image of each of up to ``rows`` classes (then more images if fewer classes)."""
    labels = train.labels
    picked: list[int] = []
    for c in range(int(labels.max()) + 1 if labels.numel() else 0):
        hits = (labels == c).nonzero().flatten()
        if hits.numel():
            picked.append(int(hits[0]))
        if len(picked) == rows:
            break
    for i in range(len(labels)):
        if len(picked) >= min(rows, len(labels)):
            break
        if i not in picked:
            picked.append(i)
    return train.images[sorted(picked)]


def augmentation_grid(
    images: torch.Tensor, spec: AugmentSpec, mean: Sequence[float], std: Sequence[float], views: int = VIEWS, seed: int = 0
) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per image, the original then ``views`` augmentations.

    Uses the run's own ``AugmentSpec`` through ``augment_batch`` on normalised inputs with
    a private generator (the training RNG streams are untouched), then de-normalises with
    the run's mean/std; pixels are shown 3x enlarged.
    """
    from cifarlab.explain.overlay import denormalise

    n = images.shape[0]
    loader = DeviceLoader(Split(images, torch.zeros(n, dtype=torch.int64)), max(n, 1), device="cpu", mean=mean, std=std, shuffle=False)
    (x, _), = list(loader)
    g = torch.Generator().manual_seed(seed)
    # flip:alt: successive columns are successive epochs, each image's flip alternating.
    first = torch.rand(n, generator=g) < 0.5 if spec.flip_alternate else None
    columns = [x] + [
        augment_batch(x, spec, g, flips=None if first is None else first ^ bool(v % 2)) for v in range(views)
    ]
    pics = [denormalise(c, mean, std) for c in columns]  # each (n, H, W, 3)
    h, w = pics[0].shape[1:3]
    gap, scale = 2, 3
    canvas = np.full((n * (h * scale + gap) + gap, len(pics) * (w * scale + gap) + gap, 3), 255, np.uint8)
    for r in range(n):
        for c, p in enumerate(pics):
            y0, x0 = gap + r * (h * scale + gap), gap + c * (w * scale + gap)
            canvas[y0 : y0 + h * scale, x0 : x0 + w * scale] = p[r].repeat(scale, 0).repeat(scale, 1)
    return canvas
