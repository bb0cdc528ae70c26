"""Load a model exported in the Hugging Face layout (``cifarlab export --format hf``).

The folder holds ``config.json`` (architecture name and keyword arguments, classes,
mean/std, input size) and ``model.safetensors`` (the weights); nothing in it is a pickle,
so loading it runs no code from the file. ``cifarlab.load_pretrained(DIR)`` returns the
same ``(model, info)`` pair as ``cifarlab.load_checkpoint``: the model in eval mode on the
CPU, taking float images normalised with ``info["mean"]``/``info["std"]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from cifarlab.errors import CifarlabError

#: Files of an exported folder, in the names the Hugging Face Hub expects.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
#: ``config.json``'s ``library_name``: what marks a folder as a cifarlab export.
LIBRARY = "cifarlab"
_REQUIRED = ("architecture", "model_kwargs", "id2label", "mean", "std")


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an exported folder, checked; a one-line CifarlabError otherwise."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise CifarlabError(f"{folder}: no such folder (expected a folder written by cifarlab export --format hf)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CifarlabError(f"{folder} has no {CONFIG_FILE}: not a cifarlab export in the Hugging Face layout") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CifarlabError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("library_name") != LIBRARY:
        raise CifarlabError(f"{path} is not a cifarlab config (library_name is not {LIBRARY!r})")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise CifarlabError(f"{path} lacks {', '.join(missing)}")
    return config


def load_pretrained(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Notebook API: ``model, info = cifarlab.load_pretrained("path/to/export/hf")``.

    Builds the architecture ``config.json`` names and loads ``model.safetensors`` into it.
    Returns the model in eval mode on the CPU (it expects float (N, 3, 32, 32) images
    normalised as ``(pixels/255 - mean) / std``) and ``info``: classes, mean, std, model
    name and kwargs, the test-time augmentation it was evaluated with, and the metadata
    of the export (cifarlab version, source checkpoint).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cifarlab.models import create_model

    config = read_config(folder)
    weights_path = Path(folder) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CifarlabError(f"{folder} has no {WEIGHTS_FILE}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CifarlabError(f"{weights_path} is not a readable safetensors file ({type(exc).__name__})") from None
    name, kwargs = config["architecture"], config["model_kwargs"]
    classes = _classes(config, Path(folder) / CONFIG_FILE)
    try:
        model = create_model(name, **kwargs)
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as exc:
        raise CifarlabError(f"{weights_path} does not fit model {name}: {str(exc)[:200]}") from None
    info = {
        "model": {"name": name, "kwargs": dict(kwargs)},
        "classes": classes,
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "tta": config.get("tta", "none"),
        "export": config.get("cifarlab", {}),
    }
    return model.eval(), info


def _classes(config: dict[str, Any], path: Path) -> list[str]:
    """Class names in index order from ``id2label`` (JSON keys are strings: "0", "1", ...)."""
    id2label = config["id2label"]
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except (KeyError, TypeError):
        raise CifarlabError(f"{path}: id2label must map 0..N-1 to class names") from None
