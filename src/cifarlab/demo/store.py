"""``demo_data.npz``: what an exported demo folder needs besides its weights.

The misclassified pool, the example images, the headline numbers, the metrics and the
figures, precomputed from the run's test split, so a Hugging Face Space runs the app
from ``model.safetensors`` and this file alone, without the dataset. Plain arrays and
JSON strings only: it is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.demo.pool import Pool
from cifarlab.errors import CifarlabError

DEMO_DATA_FILE = "demo_data.npz"
DATA_VERSION = 1
_FIGURE = "figure_"  # key prefix of the figures' PNG bytes


@dataclass
class DemoData:
    """Everything :class:`~cifarlab.demo.core.DemoModel` shows that is not the model itself."""

    classes: list[str]
    pool: Pool
    examples: list[tuple[np.ndarray, str]]
    info: dict[str, Any]
    metrics: dict[str, Any]
    layers: list[str]
    figures: dict[str, bytes]


def write_demo_data(path: str | Path, data: DemoData) -> Path:
    """Write ``data`` to ``path`` (atomically) and return the path."""
    from cifarlab.checkpoint import atomic_write

    path = Path(path)
    ex = data.examples
    arrays: dict[str, np.ndarray] = {
        "version": np.int64(DATA_VERSION),
        "classes": np.array(data.classes, dtype=str),
        "pool_images": data.pool.images.numpy(),
        "pool_targets": data.pool.targets.astype(np.int64),
        "pool_preds": data.pool.preds.astype(np.int64),
        "pool_probs": data.pool.probs.astype(np.float32),
        "example_images": np.stack([img for img, _ in ex]) if ex else np.zeros((0, 32, 32, 3), np.uint8),
        "example_labels": np.array([label for _, label in ex], dtype=str),
        "info": np.array(json.dumps(data.info)),
        "metrics": np.array(json.dumps(data.metrics)),
        "layers": np.array(data.layers, dtype=str),
    }
    for name, png in data.figures.items():
        arrays[_FIGURE + name] = np.frombuffer(png, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    except OSError as exc:
        raise CifarlabError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def read_demo_data(path: str | Path) -> DemoData:
    """Read a file written by :func:`write_demo_data`; a one-line CifarlabError when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != DATA_VERSION:
                raise CifarlabError(f"{path} has demo data version {int(z['version'])}, expected {DATA_VERSION}; export again")
            pool = Pool(
                images=torch.from_numpy(z["pool_images"].copy()),
                targets=z["pool_targets"].astype(np.int64),
                preds=z["pool_preds"].astype(np.int64),
                probs=z["pool_probs"].astype(np.float32),
            )
            examples = [(img.copy(), str(label)) for img, label in zip(z["example_images"], z["example_labels"])]
            return DemoData(
                classes=[str(c) for c in z["classes"]],
                pool=pool,
                examples=examples,
                info=json.loads(str(z["info"])),
                metrics=json.loads(str(z["metrics"])),
                layers=[str(n) for n in z["layers"]],
                figures={k[len(_FIGURE):]: z[k].tobytes() for k in z.files if k.startswith(_FIGURE)},
            )
    except CifarlabError:
        raise
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise CifarlabError(f"{path} is not a readable demo data file ({type(exc).__name__}); export the folder again") from None
