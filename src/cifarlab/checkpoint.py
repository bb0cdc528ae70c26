"""Self-describing checkpoints: written atomically, read only with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitives, so the safe unpickler reads it:

    format, version       "cifarlab", 1
    model                 {"name": str, "kwargs": dict}  → create_model(name, **kwargs)
    state_dict            model weights (the unwrapped model, never DDP/compiled)
    classes, mean, std    what the model predicts and how inputs were normalised
    dataset               {"name", "root", "synthetic"}
    config                the resolved TrainConfig as a dict
    epoch, step           completed epochs, global optimizer steps
    metrics, best         last epoch's metrics; best test accuracy and its epoch
    optimizer, scheduler, scaler   states for --resume (absent in exported weights)
    versions              torch / cifarlab versions that wrote it

``model.safetensors`` holds the same weights with the description as JSON metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab.errors import CifarlabError

FORMAT = "cifarlab"
VERSION = 1
_META_KEY = "cifarlab"  # safetensors metadata key holding the JSON description


def atomic_write(path: str | os.PathLike, write: "callable") -> None:
    """Write a file so a crash at any moment leaves either the old or the new file.

    ``write(f)`` fills a temp file in the same directory; it is fsynced, renamed over
    ``path`` with os.replace (atomic on POSIX), and the directory is fsynced so the
    rename itself survives a power loss. On any error the temp file is removed and
    the previous file stays untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict (see module docstring for its keys)."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely; every failure is a one-line CifarlabError.

    Accepts ``.pt`` files written by :func:`save_checkpoint` and ``.safetensors``
    weights exported by :func:`export_safetensors`. Never unpickles arbitrary objects:
    a file that needs more than tensors and primitives is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CifarlabError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+", str(exc))
        what = found.group(0) if found else "unsupported content"
        raise CifarlabError(
            f"refusing to load {path}: it contains objects other than tensors and plain data "
            f"({what}); cifarlab never unpickles code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise CifarlabError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); use another checkpoint"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CifarlabError(f"{path} is not a cifarlab checkpoint")
    if ckpt.get("version") != VERSION:
        raise CifarlabError(f"{path} has checkpoint version {ckpt.get('version')}, expected {VERSION}")
    for key in ("model", "state_dict", "classes", "mean", "std"):
        if key not in ckpt:
            raise CifarlabError(f"checkpoint {path} lacks '{key}'")
    return ckpt


def describe(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The metadata part of a checkpoint: everything but weights and optimizer state."""
    skip = {"state_dict", "optimizer", "scheduler", "scaler", "rng", "ema_state_dict"}
    return {k: v for k, v in ckpt.items() if k not in skip}


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode, CPU)."""
    from cifarlab.models import create_model

    spec = ckpt["model"]
    model = create_model(spec["name"], **spec["kwargs"])
    weights = ckpt.get("ema_state_dict") or ckpt["state_dict"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CifarlabError(f"checkpoint weights do not fit model {spec['name']}: {str(exc)[:200]}") from None
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Notebook API: ``model, info = cifarlab.load_checkpoint(path)``.

    Returns the model in eval mode on the CPU, and its description: model name and
    kwargs, class names, mean/std, config, epoch and metrics.
    """
    ckpt = read_checkpoint(path)
    return build_model(ckpt), describe(ckpt)


def export_safetensors(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write the checkpoint's (EMA if present) weights as safetensors with a JSON description."""
    from safetensors.torch import save

    weights = ckpt.get("ema_state_dict") or ckpt["state_dict"]
    meta = {k: v for k, v in describe(ckpt).items() if k in ("model", "classes", "mean", "std", "config", "dataset", "epoch", "metrics", "versions")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    blob = save(tensors, metadata={_META_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(blob))


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError, OSError) as exc:
        raise CifarlabError(f"{path} is not a valid cifarlab safetensors file ({type(exc).__name__})") from None
    return {"format": FORMAT, "version": VERSION, **meta, "state_dict": tensors}
