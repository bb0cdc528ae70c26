"""The three dataset sources (official CIFAR-10 batches, an image folder, synthetic data).

Every source produces a :class:`Dataset` of two uint8 :class:`Split` tensors; decoded
results are cached on disk (see :mod:`cifarlab.data.cache`) so that a second load of
the same, unchanged data decodes nothing.

:func:`load_dataset` picks the source; each lives in its own module (:mod:`.cifar10`,
:mod:`.imagefolder` with :mod:`.decode`, :mod:`.synthetic`) on top of the shared types
and cache glue in :mod:`.dataset`. The other names here are re-exported so that
``cifarlab.data.sources`` keeps its public interface; to monkeypatch one, patch the
module that uses it (e.g. ``imagefolder.decode_images``), not this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CifarlabError
from .cache import default_cache_dir
from .cifar10 import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from .dataset import IMAGE_SIZE, Dataset, Split
from .decode import decode_images
from .imagefolder import SKIP_BAD_MAX_FRACTION, load_imagefolder
from .normalize import channel_stats
from .seeding import mix_seed
from .synthetic import generate_synthetic, load_synthetic

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_SIZE",
    "KINDS",
    "SKIP_BAD_MAX_FRACTION",
    "Dataset",
    "Split",
    "channel_stats",
    "decode_images",
    "generate_synthetic",
    "load_dataset",
    "mix_seed",
]

KINDS = ("cifar10", "imagefolder", "synthetic")


def load_dataset(
    kind: str,
    root: str | os.PathLike | None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    num_classes: int = 10,
    synthetic_train: int = 5000,
    synthetic_test: int = 1000,
    seed: int = 0,
    progress: bool = False,
    skip_bad: bool = False,
) -> Dataset:
    """Load a dataset, decoding it at most once per change of its files.

    Args:
        kind: ``"cifar10"`` (official python batches under ``root/cifar-10-batches-py``),
            ``"imagefolder"`` (``root/train/<class>/*`` and ``root/test/<class>/*``) or
            ``"synthetic"`` (generated; ``root`` is ignored).
        root: dataset directory (the CLI's ``--data``); required except for synthetic.
        cache_dir: where decoded splits are cached; default :func:`default_cache_dir`.
        download: for cifar10, try the official download when the files are missing.
        num_classes, synthetic_train, synthetic_test, seed: synthetic data only.
        progress: show a progress bar on stderr while decoding images.
        skip_bad: imagefolder only: leave out unreadable files instead of failing, as long
            as they are at most :data:`SKIP_BAD_MAX_FRACTION` of all files.

    Raises:
        CifarlabError: on any problem with the input data, naming the path and the fix.
    """
    kind = str(kind).strip().lower()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if kind == "synthetic":
        return load_synthetic(num_classes, synthetic_train, synthetic_test, seed, cache_root)
    if kind not in KINDS:
        raise CifarlabError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if root is None or str(root) == "":
        raise CifarlabError(f"dataset {kind!r} needs a data directory: pass --data DIR")
    root_path = Path(root).expanduser().resolve()
    try:
        if kind == "cifar10":
            return load_cifar10(root_path, cache_root, download)
        return load_imagefolder(root_path, cache_root, progress, skip_bad)
    except OSError as exc:
        # Permissions, vanished files, I/O errors while listing or reading the sources.
        where = exc.filename or root_path
        raise CifarlabError(f"cannot read {where}: {exc.strerror or exc}; check that the dataset is readable") from None
