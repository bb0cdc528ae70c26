"""The synthetic source: procedurally generated, class-balanced 32x32 images.

Needs no files and is deterministic per seed; the label is carried by oriented structure,
not by colour (see :func:`generate_synthetic`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CifarlabError
from .dataset import IMAGE_SIZE, Dataset, cached_payload, dataset_from_payload
from .normalize import channel_stats
from .seeding import mix_seed

# Bump whenever the synthetic generator's output changes, so cached copies are rebuilt.
SYNTHETIC_VERSION = 1


def generate_synthetic(n: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` class-balanced 32x32 RGB images of ``num_classes`` pattern families.

    Class ``k`` is a sinusoidal grating at orientation ``180*k/num_classes`` degrees
    (jittered by a quarter of the gap to its neighbours), with a frequency set by
    ``k % 2`` and seen through a soft window whose shape (disc, square, diamond) is set
    by ``k % 3``. Position, size, phase, the two grating colours, the background colour
    and pixel noise are random per image and independent of the class, so the mean
    colour says (almost) nothing about the label while oriented edges, which a small
    CNN learns in its first layer, say everything. Fully vectorised.
    """
    g = generator
    size = IMAGE_SIZE
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    k = labels.to(torch.float32).view(n, 1, 1, 1)
    theta = math.pi * k / num_classes + u(n, 1, 1, 1, lo=-0.25, hi=0.25) * (math.pi / num_classes)
    cycles = torch.where((labels % 2 == 0).view(n, 1, 1, 1), 2.0, 3.5) * u(n, 1, 1, 1, lo=0.9, hi=1.1)
    phase = u(n, 1, 1, 1, hi=2 * math.pi)
    cx, cy = u(n, 1, 1, 1, lo=-0.25, hi=0.25), u(n, 1, 1, 1, lo=-0.25, hi=0.25)
    radius = u(n, 1, 1, 1, lo=0.5, hi=0.8)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    dx = coords.view(1, 1, 1, size) - cx  # (n,1,1,W)
    dy = coords.view(1, 1, size, 1) - cy  # (n,1,H,1)
    # Every full-size map is built from per-row and per-column vectors (cos(a+b) and the
    # distances separate), so only a handful of (n,1,H,W) operations remain.
    # `cycles` periods across the image width (2 units).
    px = math.pi * cycles * torch.cos(theta) * dx + phase
    qy = math.pi * cycles * torch.sin(theta) * dy
    grating = torch.addcmul(torch.cos(px) * torch.cos(qy), torch.sin(px), torch.sin(qy), value=-1.0)

    shape = (labels % 3).view(n, 1, 1, 1)
    ax, ay = (dx / radius).abs_(), (dy / radius).abs_()
    disc = torch.sqrt(ax * ax + ay * ay)
    # 0.85 and 1.2: the three windows cover similar areas, so the fraction of background
    # (hence the mean colour) barely depends on the class.
    square = torch.maximum(ax / 0.85, ay / 0.85)
    diamond = ax / 1.2 + ay / 1.2
    dist = torch.where(shape == 0, disc, torch.where(shape == 1, square, diamond))
    window = torch.sigmoid_(dist.mul_(-12.0).add_(12.0))  # sigmoid(12*(1-dist)): ~1 px soft edge

    c1 = u(n, 3, 1, 1)
    c2 = torch.remainder(c1 + u(n, 3, 1, 1, lo=0.3, hi=0.7), 1.0)  # >= 0.3 contrast per channel
    background = u(n, 3, 1, 1)
    t = grating.add_(1).mul_(0.5)
    # img = window*(c1*t + c2*(1-t)) + (1-window)*bg, written as in-place ops on one
    # (n,3,H,W) buffer: allocating full-size temporaries is what dominates the cost.
    img = (c1 - c2) * t
    img.add_(c2 - background).mul_(window).add_(background)
    # Luminance noise (one draw per pixel, shared by the channels): a third of the RNG cost.
    img.add_(torch.randn(n, 1, size, size, generator=g).mul_(0.06))
    images = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return images, labels


def load_synthetic(num_classes: int, n_train: int, n_test: int, seed: int, cache_root: Path) -> Dataset:
    """Generate (or load from the cache) ``n_train``/``n_test`` images of ``num_classes`` classes.

    Deterministic per ``seed``; the test split has its own random stream, so changing
    ``n_train`` leaves it unchanged. Raises :class:`CifarlabError` for impossible sizes.
    """
    if num_classes < 2:
        raise CifarlabError(f"synthetic data needs at least 2 classes, got num_classes={num_classes}")
    if n_train < num_classes or n_test < 1:
        raise CifarlabError(
            f"synthetic data needs >= num_classes ({num_classes}) training and >= 1 test images, "
            f"got {n_train} and {n_test}"
        )
    identity = {
        "kind": "synthetic",
        "version": SYNTHETIC_VERSION,
        "num_classes": int(num_classes),
        "train": int(n_train),
        "test": int(n_test),
        "seed": int(seed),
    }

    def build() -> dict[str, Any]:
        # Separate streams per split: the test set does not change when the train size does.
        train_images, train_labels = generate_synthetic(
            n_train, num_classes, torch.Generator().manual_seed(mix_seed(seed, 0))
        )
        test_images, test_labels = generate_synthetic(n_test, num_classes, torch.Generator().manual_seed(mix_seed(seed, 1)))
        mean, std = channel_stats(train_images)
        return {
            "classes": [f"class{i}" for i in range(num_classes)],
            "train_images": train_images,
            "train_labels": train_labels,
            "test_images": test_images,
            "test_labels": test_labels,
            "mean": list(mean),
            "std": list(std),
        }

    payload = cached_payload(identity, [], cache_root, build)
    return dataset_from_payload("synthetic", None, payload, synthetic=True)
