"""What every source produces: uint8 :class:`Split` pairs inside a :class:`Dataset`, and
the cache glue that all sources share (get the decoded payload from the on-disk cache or
build and store it; turn a payload into a :class:`Dataset`).

The sources themselves live in :mod:`.cifar10`, :mod:`.imagefolder` and :mod:`.synthetic`;
:func:`cifarlab.data.sources.load_dataset` picks one. This module sits below all of them so
that none of them needs to import the dispatcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import CifarlabError
from . import cache as _cache

log = logging.getLogger(__name__)

IMAGE_SIZE = 32

# Seed of the fixed per-class order used by Split.take (any constant works; never change it,
# or subsets drawn by earlier runs stop being reproducible).
_TAKE_SEED = 20240601


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: uint8 images (N,3,32,32) on the CPU and int64 labels (N,).

    ``eq=False``: comparing tensors elementwise has no single truth value; compare the
    fields with ``torch.equal`` instead.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Split.images must be uint8 (N,3,H,W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"Split.labels must be (N,) matching images, got {tuple(labels.shape)}")
        # frozen dataclass: normalise through object.__setattr__ so every Split is CPU/contiguous/int64.
        object.__setattr__(self, "images", images.cpu().contiguous())
        object.__setattr__(self, "labels", labels.cpu().to(torch.int64).contiguous())

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, n: int | None) -> "Split":
        """Deterministic class-balanced subset of ``n`` samples (``None`` or ``n >= N``: self).

        Each class's samples are put in a fixed pseudo-random order (seed ``_TAKE_SEED``),
        then classes are visited round-robin in label order, taking the next sample of
        each, skipping exhausted classes. So every class gets ``n // C`` or one more
        (while it has samples), ``take(m)`` contains ``take(n)`` for ``m > n``, and the
        result never depends on anything but the split itself. Selected samples keep
        their original order.
        """
        if n is None or n >= len(self):
            return self
        chosen = self._balanced_indices(n)
        return Split(self.images[chosen], self.labels[chosen])

    def hold_out(self, n: int) -> tuple["Split", "Split"]:
        """``(rest, held)``: ``held`` is ``take(n)``, ``rest`` every other sample (original order).

        For tuning on a validation set carved out of train: the same ``n`` always holds
        out the same images, whatever the seed, so runs with different seeds compare.
        """
        if not 0 < n < len(self):
            raise CifarlabError(f"cannot hold out {n} of {len(self)} training images; use 1..{len(self) - 1}")
        chosen = self._balanced_indices(n)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[chosen] = False
        return Split(self.images[keep], self.labels[keep]), Split(self.images[chosen], self.labels[chosen])

    def _balanced_indices(self, n: int) -> torch.Tensor:
        """Sorted indices of the class-balanced subset of size ``n`` (see :meth:`take`)."""
        total = len(self)
        if n < 0:
            raise CifarlabError(f"subset size must be >= 0, got {n}")
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        g = torch.Generator().manual_seed(_TAKE_SEED)
        perm = torch.randperm(total, generator=g)
        lab = self.labels[perm]
        order = torch.argsort(lab, stable=True)  # grouped by class, seeded order within a class
        grouped = lab[order]
        counts = torch.bincount(grouped)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(total) - starts[grouped]  # position within its class
        num_classes = int(counts.numel())
        round_robin = torch.argsort(rank * num_classes + grouped, stable=True)[:n]
        chosen, _ = torch.sort(perm[order[round_robin]])
        return chosen


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: both splits, class names and the normalisation statistics."""

    name: str
    root: str | None
    classes: tuple[str, ...]
    train: Split
    test: Split
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    synthetic: bool
    skipped: tuple[str, ...] = ()  # unreadable files left out by skip_bad (image folders)
    # What ``test`` holds: the real test split, or "holdout" images carved out of train
    # (``--holdout N``) so a recipe can be tuned without looking at the test split.
    eval_split: str = "test"

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)


# --------------------------------------------------------------------------- caching glue


def cached_payload(
    identity: dict[str, Any],
    entries: Sequence[tuple[str, int, int]],
    cache_root: Path,
    build: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Return the payload for ``identity`` from the cache, building and storing it on a miss.

    ``identity`` names the cache file and ``entries`` (relpath, size, mtime_ns per source
    file) complete its key (see :mod:`.cache`); ``build`` returns the payload layout that
    :func:`dataset_from_payload` reads. A cached payload that loads but is malformed is
    logged and rebuilt, never trusted.
    """
    path = _cache.cache_path(cache_root, identity)
    key = _cache.fingerprint(identity, entries)
    payload = _cache.load(path, key)
    if payload is not None:
        try:
            _check_payload(payload)
            return payload
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring inconsistent dataset cache %s (%s); rebuilding it", path, exc)
    payload = build()
    _cache.save(path, key, payload)
    return payload


def _check_payload(p: dict[str, Any]) -> None:
    """Reject a cache payload that loads but is not what we would have written."""
    for split in ("train", "test"):
        images, labels = p[f"{split}_images"], p[f"{split}_labels"]
        if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
            raise TypeError(f"{split} tensors missing")
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{split} images have shape {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"{split} labels have shape {tuple(labels.shape)}")
    if len(p["classes"]) < 1 or len(p["mean"]) != 3 or len(p["std"]) != 3:
        raise ValueError("classes/mean/std malformed")


def dataset_from_payload(name: str, root: Path | None, payload: dict[str, Any], synthetic: bool) -> Dataset:
    """Wrap a (cached or freshly built) payload as a :class:`Dataset` named ``name``."""
    return Dataset(
        name=name,
        root=str(root) if root is not None else None,
        classes=tuple(str(c) for c in payload["classes"]),
        train=Split(payload["train_images"], payload["train_labels"]),
        test=Split(payload["test_images"], payload["test_labels"]),
        mean=tuple(float(v) for v in payload["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in payload["std"]),  # type: ignore[arg-type]
        synthetic=synthetic,
        skipped=tuple(str(p) for p in payload.get("skipped", ())),
    )
