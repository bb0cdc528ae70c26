"""Hugging Face-style export: a folder the Hub shows as a model, loadable with ``cifarlab.load_pretrained``.

    model.safetensors          the weights (cifarlab's safetensors export, description as metadata)
    config.json                architecture name and kwargs, num_classes, id2label/label2id, mean, std,
                               image size, input convention, test-time augmentation, export metadata
    preprocessor_config.json   the same preprocessing in the Hub's image-processor terms
    README.md                  the model card (cifarlab.export.card), written once verified

Nothing in the folder is a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from cifarlab.checkpoint import atomic_write, export_safetensors
from cifarlab.data.dataset import IMAGE_SIZE
from cifarlab.pretrained import CARD_FILE, CONFIG_FILE, LIBRARY, WEIGHTS_FILE, load_pretrained, read_config

PREPROCESSOR_FILE = "preprocessor_config.json"


def hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for an export described by ``meta``."""
    classes = meta["classes"]
    return {
        "library_name": LIBRARY,
        "architecture": meta["model"]["name"],
        "model_kwargs": meta["model"]["kwargs"],
        "num_classes": len(classes),
        "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
        "mean": meta["mean"],
        "std": meta["std"],
        "image_size": IMAGE_SIZE,
        "num_channels": 3,
        "input": meta["input"],
        "tta": meta["tta"],
        "cifarlab": meta,
    }


def preprocessor_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing in the keys of the Hub's image processors (resample 2 = bilinear)."""
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": meta["mean"],
        "image_std": meta["std"],
    }


def write_hf(ckpt: dict[str, Any], folder: Path, meta: dict[str, Any]) -> None:
    """Write weights, ``config.json`` and ``preprocessor_config.json`` into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    export_safetensors(folder / WEIGHTS_FILE, ckpt)
    _write_json(folder / CONFIG_FILE, hf_config(meta))
    _write_json(folder / PREPROCESSOR_FILE, preprocessor_config(meta))


def write_card(folder: Path, text: str) -> None:
    """Write the model card ``README.md``."""
    atomic_write(folder / CARD_FILE, lambda f: f.write(text.encode("utf-8")))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_hf_metadata(folder: Path) -> dict[str, Any]:
    """The export description in a folder's ``config.json`` (one-line CifarlabError if it is not one)."""
    return read_config(folder).get("cifarlab") or {}


def hf_runner(folder: Path, device: str = "cpu") -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(run, description)``: ``run(uint8 pixels) -> logits`` through ``cifarlab.load_pretrained``."""
    from cifarlab.data.normalize import normalize
    from cifarlab.engine import predict_logits

    model, info = load_pretrained(folder)
    model = model.to(device)

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict_logits(model, normalize(pixels, info["mean"], info["std"], device), info["tta"])

    return run, f"cifarlab.load_pretrained, {device.upper()}"
