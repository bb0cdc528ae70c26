"""The official CIFAR-10 source: the python pickle batches under ``<root>/cifar-10-batches-py``.

Missing files are downloaded (torchvision's md5-checked downloader) when allowed, and
every file's official md5 is verified before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import CifarlabError
from .dataset import IMAGE_SIZE, Dataset, cached_payload, dataset_from_payload

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


def load_cifar10(root: Path, cache_root: Path, download: bool) -> Dataset:
    """Load CIFAR-10 from ``root/cifar-10-batches-py`` (``root`` absolute), downloading it if allowed.

    Raises :class:`CifarlabError` naming the directory and the fix when files are
    missing (and cannot be downloaded) or fail their md5 check.
    """
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
    payload = cached_payload(identity, entries, cache_root, lambda: _read_cifar10(base))
    return dataset_from_payload("cifar10", root, payload, synthetic=False)


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
