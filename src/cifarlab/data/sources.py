"""The three dataset sources (official CIFAR-10 batches, an image folder, synthetic data).

Every source produces a :class:`Dataset` of two uint8 :class:`Split` tensors; decoded
results are cached on disk (see :mod:`cifarlab.data.cache`) so that a second load of
the same, unchanged data decodes nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing
import os
import pickle
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import CifarlabError
from . import cache as _cache
from .cache import default_cache_dir

log = logging.getLogger(__name__)

IMAGE_SIZE = 32

KINDS = ("cifar10", "imagefolder", "synthetic")

# Per-channel statistics of the official CIFAR-10 training set in pixel/255 units,
# population std over all 50000*32*32 pixels of each channel. The widely copied
# (0.2023, 0.1994, 0.2010) is (close to) the average of per-image
# stds, which leaves out the spread between images and is too small.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Exactly what torchvision.datasets.CIFAR10 uses (URL, archive md5, per-file md5s).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_FILES = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES + (CIFAR10_META_FILE,)
CIFAR10_MD5 = MappingProxyType({
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
})

# Bump whenever the synthetic generator's output changes, so cached copies are rebuilt.
SYNTHETIC_VERSION = 1
# Bump whenever image decoding/resizing changes (decoded imagefolder caches depend on it).
# 2: 16-bit grayscale PNGs are scaled to 8 bits instead of clipped to white.
DECODER_VERSION = 2

# Below this many files a process pool costs more (fork + result transfer) than it saves.
_POOL_MIN_FILES = 2048
# Names that file managers drop into folders; they are never images.
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
# Folders that archivers and OS tools create; never classes, never images.
_JUNK_DIRS = frozenset({"__macosx"})
# How many bad paths an error message lists before pointing at the full list's file.
_MAX_LISTED = 5
# --skip-bad refuses to train when more than this fraction of the files is unreadable:
# beyond a few stray files, a broken dataset is the likelier explanation.
SKIP_BAD_MAX_FRACTION = 0.01
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
        return _load_synthetic(num_classes, synthetic_train, synthetic_test, seed, cache_root)
    if kind not in KINDS:
        raise CifarlabError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if root is None or str(root) == "":
        raise CifarlabError(f"dataset {kind!r} needs a data directory: pass --data DIR")
    root_path = Path(root).expanduser().resolve()
    try:
        if kind == "cifar10":
            return _load_cifar10(root_path, cache_root, download)
        return _load_imagefolder(root_path, cache_root, progress, skip_bad)
    except OSError as exc:
        # Permissions, vanished files, I/O errors while listing or reading the sources.
        where = exc.filename or root_path
        raise CifarlabError(f"cannot read {where}: {exc.strerror or exc}; check that the dataset is readable") from None


# --------------------------------------------------------------------------- caching glue


def _cached(
    identity: dict[str, Any],
    entries: Sequence[tuple[str, int, int]],
    cache_root: Path,
    build: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Return the payload for ``identity`` from the cache, building and storing it on a miss."""
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


def _dataset(name: str, root: Path | None, payload: dict[str, Any], synthetic: bool) -> Dataset:
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


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 (N,C,H,W) images, in pixel/255 units.

    Works from an exact 256-bin histogram per channel (integer counts), so the moments
    are exact up to the final float64 division, and it is ~10x faster than summing
    50k images in int64 or float64 (no wide copy of the data).
    """
    if images.shape[0] == 0:
        raise CifarlabError("cannot compute normalisation statistics of an empty training split")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        count = hist.sum()
        mean = (hist * values).sum() / count
        var = ((hist * (values - mean) ** 2).sum() / count).clamp_min(0.0)
        means.append(float(mean) / 255.0)
        stds.append(float(var.sqrt()) / 255.0)
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------- cifar10


def _load_cifar10(root: Path, cache_root: Path, download: bool) -> Dataset:
    base = root / CIFAR10_DIR
    if _missing_cifar10(base):
        if download:
            _download_cifar10(root, base)
        else:
            raise CifarlabError(_cifar10_missing_message(base, "downloading is disabled"))
    entries = []
    for name in CIFAR10_FILES:
        st = (base / name).stat()
        entries.append((name, st.st_size, st.st_mtime_ns))
    # The stats are constants, but they are stored in the cache: key on them so a fix here reaches old caches.
    identity = {"kind": "cifar10", "root": str(root), "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    payload = _cached(identity, entries, cache_root, lambda: _read_cifar10(base))
    return _dataset("cifar10", root, payload, synthetic=False)


def _missing_cifar10(base: Path) -> list[str]:
    return [name for name in CIFAR10_FILES if not (base / name).is_file()]


def _cifar10_missing_message(base: Path, why: str) -> str:
    names = ", ".join(CIFAR10_FILES)
    missing = ", ".join(_missing_cifar10(base))
    return (
        f"CIFAR-10 not found in {base} (missing: {missing}; expected the official python "
        f"batches: {names}) and {why}. Download {CIFAR10_URL}, extract it into {base.parent}, "
        f"or pass --data DIR pointing at the directory that contains {CIFAR10_DIR}/"
    )


def _download_cifar10(root: Path, base: Path) -> None:
    """Fetch and extract the official archive with torchvision's downloader (md5-checked)."""
    # Imported here: torchvision.datasets is heavy, and only this rare path needs it.
    from torchvision.datasets import utils as tv_utils

    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(
            CIFAR10_URL, download_root=str(root), filename=CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5
        )
    except Exception as exc:  # noqa: BLE001 - any network/disk failure is reported the same way
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CifarlabError(_cifar10_missing_message(base, f"the download failed ({reason})")) from None
    if _missing_cifar10(base):
        raise CifarlabError(_cifar10_missing_message(base, "the downloaded archive did not contain them"))


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # integrity check, not security; allowed under FIPS
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_cifar10(base: Path) -> dict[str, Any]:
    """Verify every file's official md5 first, then unpickle (pickle runs code: never on unverified bytes)."""
    bad = []
    for name in CIFAR10_FILES:
        expected = CIFAR10_MD5[name]
        got = _md5(base / name)
        if got != expected:
            bad.append(f"{base / name} (md5 {got}, expected {expected})")
    if bad:
        raise CifarlabError(
            "CIFAR-10 checksum mismatch: " + "; ".join(bad) + ". The file is corrupt or not the official "
            "python version: delete it (or the whole directory) and re-download, e.g. by running again with download enabled"
        )

    def unpickle(name: str) -> dict[str, Any]:
        with open(base / name, "rb") as fh:
            return pickle.load(fh, encoding="latin1")

    def split(files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        data, labels = [], []
        for name in files:
            entry = unpickle(name)
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.extend(entry["labels"])
        images = np.concatenate(data).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        return torch.from_numpy(images).contiguous(), torch.tensor(labels, dtype=torch.int64)

    classes = [str(c) for c in unpickle(CIFAR10_META_FILE)["label_names"]]
    train_images, train_labels = split(CIFAR10_TRAIN_FILES)
    test_images, test_labels = split(CIFAR10_TEST_FILES)
    return {
        "classes": classes,
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
    }


# --------------------------------------------------------------------------- imagefolder


def _skip(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_FILES or name.lower() in _JUNK_DIRS


def _class_dirs(split_dir: Path) -> dict[str, str]:
    """Map class name -> directory path for the non-hidden subdirectories of ``split_dir``."""
    with os.scandir(split_dir) as it:
        return {e.name: e.path for e in it if not _skip(e.name) and e.is_dir()}


def _list_files(directory: str, rel_prefix: str, out: list[tuple[str, str, int, int]]) -> None:
    """Append (abs path, relpath, size, mtime_ns) of every non-hidden file below ``directory``.

    ``os.scandir`` gives the file type for free and one stat per file (for the cache
    fingerprint): 60k files take ~0.3 s, far less than decoding any of them.
    """
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if _skip(e.name):
            continue
        rel = f"{rel_prefix}/{e.name}"
        if e.is_dir():
            _list_files(e.path, rel, out)
        elif e.is_file():
            st = e.stat()
            out.append((e.path, rel, st.st_size, st.st_mtime_ns))


def _scan_imagefolder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, str, int, int]]], dict[str, list[int]]]:
    """Validate the layout; return classes, per-split file lists and labels."""
    layout = f"expected {root}/train/<class>/<images> and {root}/test/<class>/<images>"
    if not root.is_dir():
        raise CifarlabError(f"image folder {root} does not exist; {layout}. Pass --data DIR")
    split_classes = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise CifarlabError(f"image folder split {split_dir} is missing; {layout}")
        split_classes[split] = _class_dirs(split_dir)
    train_dirs, test_dirs = split_classes["train"], split_classes["test"]
    if not train_dirs:
        raise CifarlabError(f"{root / 'train'} has no class subfolders; {layout}")
    only_train = sorted(set(train_dirs) - set(test_dirs))
    only_test = sorted(set(test_dirs) - set(train_dirs))
    if only_train or only_test:
        raise CifarlabError(
            f"train and test class folders under {root} differ (only in train: {only_train or 'none'}; "
            f"only in test: {only_test or 'none'}); make {root / 'train'} and {root / 'test'} "
            "contain the same class subfolders"
        )
    classes = sorted(train_dirs)
    files: dict[str, list[tuple[str, str, int, int]]] = {}
    labels: dict[str, list[int]] = {}
    for split, dirs in (("train", train_dirs), ("test", test_dirs)):
        files[split], labels[split] = [], []
        for label, name in enumerate(classes):
            before = len(files[split])
            _list_files(dirs[name], f"{split}/{name}", files[split])
            added = len(files[split]) - before
            if added == 0:
                raise CifarlabError(f"class folder {dirs[name]} contains no image files; add images or remove the folder")
            labels[split].extend([label] * added)
    return classes, files, labels


def _read_bytes(path: str) -> bytes:
    # os.open/os.read costs about half of open().read() per file (no buffered-IO object).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        parts = []
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            parts.append(block)
    finally:
        os.close(fd)
    return b"".join(parts)


def _resize(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    # Pillow's BILINEAR widens its kernel when shrinking, i.e. it antialiases.
    im = Image.fromarray(rgb, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(im)


def _jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's libjpeg-turbo op, or None where it is unavailable.

    It decodes a tiny JPEG ~2x faster than Pillow with pixel-identical output (both
    are libjpeg-turbo with default settings: islow IDCT, fancy upsampling). The raw op
    is called rather than ``torchvision.io.decode_jpeg``, whose wrapper issues a
    DeprecationWarning per call since torchvision 0.29 and costs ~20 us of Python per
    image. If a future torchvision drops the op, decoding silently falls back to
    Pillow: same pixels, just slower.
    """
    op = _registered_jpeg_op()
    if op is None:
        _load_image_ops()
        op = _registered_jpeg_op()
    if op is None:
        return None
    # Mode 0 = ImageReadMode.UNCHANGED: keep 1 or 3 channels, let us handle the rest.
    return lambda data: op(data, 0, False)


def _registered_jpeg_op() -> Callable[..., torch.Tensor] | None:
    try:
        return torch.ops.image.decode_jpeg
    except Exception:  # noqa: BLE001 - not registered (yet)
        return None


def _load_image_ops() -> None:
    """Register torchvision's image ops, loading just their library when possible.

    ``import torchvision`` costs ~1.5 s (it pulls in models, ops and datasets), a third
    of a cold CIFAR-sized load; loading ``image_stable`` the way torchvision itself
    does (same file, same ``torch.ops.load_library``) takes milliseconds and a later
    ``import torchvision`` reuses it. Windows needs torchvision's DLL-path setup, and
    any surprise just means the full import.
    """
    if os.name == "posix":
        try:
            from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, FileFinder
            from importlib.util import find_spec

            spec = find_spec("torchvision")
            if spec is not None and spec.submodule_search_locations:
                finder = FileFinder(list(spec.submodule_search_locations)[0], (ExtensionFileLoader, EXTENSION_SUFFIXES))
                for name in ("image_stable", "image"):  # torchvision >= 0.27 and older names
                    lib = finder.find_spec(name)
                    if lib is not None and lib.origin:
                        torch.ops.load_library(lib.origin)
                        return
        except Exception:  # noqa: BLE001 - fall through to the regular import
            pass
    try:
        import torchvision.io.image  # noqa: F401 - registers torch.ops.image.*
    except Exception:  # noqa: BLE001 - no torchvision image ops: Pillow only
        pass


def _decode_jpeg_fast(decoder: Callable[[torch.Tensor], torch.Tensor], data: bytes) -> np.ndarray | None:
    """Decode with the fast op; None (caller falls back to Pillow, which decides what is
    "unreadable") for anything unusual: CMYK/YCCK JPEGs, decoder errors or warnings."""
    try:
        out = decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except Exception:  # noqa: BLE001 - Pillow gets the final word
        return None
    if out.dim() != 3:
        return None
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1)  # grayscale -> RGB replicates, exactly like Pillow's convert("RGB")
    elif out.shape[0] != 3:
        return None
    return out.permute(1, 2, 0).numpy()


def _decode_image(path: str, decoder: Callable[[torch.Tensor], torch.Tensor] | None) -> np.ndarray:
    """Decode one file to a (32,32,3) uint8 RGB array; raises on anything Pillow cannot read."""
    data = _read_bytes(path)
    rgb = None
    if decoder is not None and data[:3] == b"\xff\xd8\xff":  # JPEG start-of-image marker
        rgb = _decode_jpeg_fast(decoder, data)
    if rgb is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            rgb = _to_rgb(im)
    if rgb.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = _resize(np.ascontiguousarray(rgb))
    return rgb


def _to_rgb(im: Any) -> np.ndarray:
    """A Pillow image of any mode as (H, W, 3) uint8 RGB.

    ``convert("RGB")`` handles 8-bit modes (L, LA, P, RGBA: alpha dropped, CMYK, YCbCr)
    but *clips* 16/32-bit grayscale (PNG ``I;16``, ``I``) at 255, turning a 16-bit scan
    nearly white; those are scaled down to their top 8 bits instead. 16-bit RGB(A) PNGs
    already open as 8-bit RGB(A).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
            gray = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            gray = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        else:
            gray = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _decode_chunk(paths: Sequence[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode ``paths`` into one (n,32,32,3) array; failures are collected, not raised.

    Collecting lets a single pass report *every* bad file at once. Runs in pool workers,
    so it must stay a picklable module-level function.
    """
    decoder = _jpeg_decoder()
    out = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    bad: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            out[i] = _decode_image(path, decoder)
        except Exception as exc:  # noqa: BLE001 - every failure means "unreadable image"
            bad.append((path, " ".join(str(exc).split())[:120] or type(exc).__name__))
    return out, bad


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork (Linux) starts workers in milliseconds without re-importing torch (~2 s per
    # worker with spawn); it is safe here for the same reason it is for torch's own
    # DataLoader workers: the children only touch CPU tensors, Pillow and numpy.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def decode_images(paths: Sequence[str], *, progress: bool = False, desc: str = "decoding") -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Decode image files to a uint8 (N,3,32,32) tensor, using one process per CPU for large sets.

    Returns the images and the list of ``(path, reason)`` that failed to decode (their
    slots are zero). Files go to workers in contiguous chunks (several per worker, for
    load balance and a smooth progress bar); the parent only concatenates.
    """
    n = len(paths)
    workers = os.cpu_count() or 1
    # Register the decoder here, before forking, so that workers inherit it instead of
    # each loading it on its first chunk.
    _jpeg_decoder()
    bar = _progress_bar(n, desc) if progress else None
    if n < _POOL_MIN_FILES or workers < 2:
        chunks = [list(paths[i : i + 1024]) for i in range(0, n, 1024)]
        results = []
        for chunk in chunks:
            results.append(_decode_chunk(chunk))
            if bar is not None:
                bar.update(len(chunk))
    else:
        size = max(256, min(2048, math.ceil(n / (workers * 8))))
        chunks = [list(paths[i : i + size]) for i in range(0, n, size)]
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_pool_context()) as pool:
            futures = [pool.submit(_decode_chunk, chunk) for chunk in chunks]
            results = []
            for fut, chunk in zip(futures, chunks):
                results.append(fut.result())
                if bar is not None:
                    bar.update(len(chunk))
    if bar is not None:
        bar.close()
    bad = [b for _, chunk_bad in results for b in chunk_bad]
    if results:
        hwc = np.concatenate([arr for arr, _ in results])
    else:
        hwc = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    return images, bad


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)


def _load_imagefolder(root: Path, cache_root: Path, progress: bool, skip_bad: bool = False) -> Dataset:
    classes, files, labels = _scan_imagefolder(root)
    entries = [(rel, size, mtime) for split in ("train", "test") for _, rel, size, mtime in files[split]]
    identity = {"kind": "imagefolder", "root": str(root), "decoder": DECODER_VERSION, "size": IMAGE_SIZE}
    if skip_bad:
        # Leaving files out gives a different payload: it gets its own cache entry, so a
        # later run without --skip-bad still reports the bad files instead of hiding them.
        identity["skip_bad"] = True

    def build() -> dict[str, Any]:
        paths = [p for split in ("train", "test") for p, _, _, _ in files[split]]
        # The decode pass is the pre-scan: it tries every file and collects every failure,
        # so one run lists all bad files instead of failing on them one at a time.
        images, bad = decode_images(paths, progress=progress, desc=f"decoding {root.name}")
        n_train = len(files["train"])
        split_labels = {"train": labels["train"], "test": labels["test"]}
        skipped: list[str] = []
        if bad:
            _check_bad_files(root, cache_root, bad, len(paths), skip_bad)
            bad_paths = {p for p, _ in bad}
            keep = torch.tensor([p not in bad_paths for p in paths])
            skipped = [p for p, _ in bad]
            for split, offset in (("train", 0), ("test", n_train)):
                mask = keep[offset : offset + len(files[split])].tolist()
                split_labels[split] = [lab for lab, ok in zip(labels[split], mask) if ok]
                _check_classes_survive(root, split, classes, labels[split], split_labels[split])
            train_images = images[:n_train][keep[:n_train]].contiguous()
            test_images = images[n_train:][keep[n_train:]].contiguous()
        else:
            train_images, test_images = images[:n_train].contiguous(), images[n_train:].contiguous()
        mean, std = channel_stats(train_images)
        return {
            "classes": classes,
            "train_images": train_images,
            "train_labels": torch.tensor(split_labels["train"], dtype=torch.int64),
            "test_images": test_images,
            "test_labels": torch.tensor(split_labels["test"], dtype=torch.int64),
            "mean": list(mean),
            "std": list(std),
            "skipped": skipped,
        }

    payload = _cached(identity, entries, cache_root, build)
    return _dataset("imagefolder", root, payload, synthetic=False)


def _check_bad_files(root: Path, cache_root: Path, bad: list[tuple[str, str]], total: int, skip_bad: bool) -> None:
    """Raise the one-line error for unreadable files, unless --skip-bad may skip them.

    The full list (path and reason per line) goes to a file whose path the message
    names: a dataset with 3,000 bad files would not fit on a line.
    """
    listing = _write_bad_list(root, cache_root, bad)
    first = "; ".join(f"{p} ({why})" for p, why in bad[:_MAX_LISTED])
    more = f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    where = f"full list in {listing}" if listing else "could not write the full list"
    head = f"{len(bad)} file(s) under {root} (of {total}) could not be read as images: {first}{more}; {where}"
    limit = SKIP_BAD_MAX_FRACTION * total
    if not skip_bad:
        advice = "Remove or replace them"
        if len(bad) <= limit:
            advice += ", or pass --skip-bad to train without them"
        raise CifarlabError(f"{head}. {advice}")
    if len(bad) > limit:
        raise CifarlabError(
            f"{head}. That is {len(bad) / total:.1%} of the files, more than the {SKIP_BAD_MAX_FRACTION:.0%} "
            "--skip-bad tolerates: the dataset looks broken; fix it rather than skipping"
        )


def _write_bad_list(root: Path, cache_root: Path, bad: list[tuple[str, str]]) -> Path | None:
    """Write 'path<TAB>reason' lines next to the cache (the data folder may be read-only)."""
    digest = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:12]
    text = "".join(f"{p}\t{why}\n" for p, why in bad)
    for folder in (cache_root / "bad-files", Path(tempfile.gettempdir())):
        path = folder / f"{root.name or 'data'}-{digest}-unreadable.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _check_classes_survive(root: Path, split: str, classes: Sequence[str], before: Sequence[int], after: Sequence[int]) -> None:
    had, has = set(before), set(after)
    emptied = [classes[c] for c in sorted(had - has)]
    if emptied:
        raise CifarlabError(
            f"--skip-bad would leave class folder(s) {', '.join(emptied)} of {root / split} without any readable "
            "image; fix or remove them"
        )


# --------------------------------------------------------------------------- synthetic


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser per step: nearby inputs diverge)."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h ^= h >> 30
        h = (h * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


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


def _load_synthetic(num_classes: int, n_train: int, n_test: int, seed: int, cache_root: Path) -> Dataset:
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

    payload = _cached(identity, [], cache_root, build)
    return _dataset("synthetic", None, payload, synthetic=True)
