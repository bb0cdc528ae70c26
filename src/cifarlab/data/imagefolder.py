"""The image-folder source: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``.

Scans and validates the layout, decodes every file (see :mod:`.decode`) and handles
unreadable files: by default one error lists them all; ``skip_bad`` (``--skip-bad``)
leaves out a few of them instead.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CifarlabError
from .dataset import IMAGE_SIZE, Dataset, cached_payload, dataset_from_payload
from .decode import DECODER_VERSION, decode_images
from .normalize import channel_stats

# Names that file managers drop into folders; they are never images.
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
# Folders that archivers and OS tools create; never classes, never images.
_JUNK_DIRS = frozenset({"__macosx"})
# How many bad paths an error message lists before pointing at the full list's file.
_MAX_LISTED = 5
# --skip-bad refuses to train when more than this fraction of the files is unreadable:
# beyond a few stray files, a broken dataset is the likelier explanation.
SKIP_BAD_MAX_FRACTION = 0.01


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


def load_imagefolder(root: Path, cache_root: Path, progress: bool, skip_bad: bool = False) -> Dataset:
    """Load the image folder at ``root`` (absolute), decoding it only on a cache miss.

    Raises :class:`CifarlabError` for a bad layout and for unreadable files, unless
    ``skip_bad`` may leave them out (at most :data:`SKIP_BAD_MAX_FRACTION` of all files,
    and no class may lose all of its images).
    """
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

    payload = cached_payload(identity, entries, cache_root, build)
    return dataset_from_payload("imagefolder", root, payload, synthetic=False)


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
