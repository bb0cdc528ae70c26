"""``.pt2`` export: a ``torch.export`` program that any PyTorch program loads without cifarlab.

``torch.export.load("model.pt2").module()`` is a callable taking uint8 RGB pixels
(N, 3, 32, 32) and returning logits, the normalisation inside (see
:mod:`cifarlab.export.wrapper`). The export description rides along as the archive's
extra file ``cifarlab.json``.

``torch.export.load`` falls back to full unpickling for some archive entries (tensor
subclasses, custom objects, sample inputs it cannot load safely), so a ``.pt2`` given
to ``--check`` is inspected first and refused if any entry would need that: cifarlab
never unpickles code.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from cifarlab.errors import CifarlabError
from cifarlab.export.errors import first_line

META_FILE = "cifarlab.json"


def export_pt2(program: torch.export.ExportedProgram, path: Path, meta: dict[str, Any]) -> None:
    """Save ``program`` (from :func:`cifarlab.export.wrapper.trace`) to ``path`` with ``meta``."""
    torch.export.save(program, str(path), extra_files={META_FILE: json.dumps(meta)})


def read_pt2_metadata(path: Path) -> dict[str, Any]:
    """The cifarlab description inside a ``.pt2`` archive; one-line CifarlabError for anything else."""
    names = _archive_names(path)
    extra = [n for n in names if n.endswith(f"/extra/{META_FILE}")]
    if not extra:
        raise CifarlabError(f"{path} is a torch.export archive but not a cifarlab export (no {META_FILE})")
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(extra[0]).decode("utf-8"))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CifarlabError(f"{path}: its {META_FILE} is unreadable ({type(exc).__name__})") from None


def _archive_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CifarlabError(f"{path} is not a torch.export archive (.pt2) ({type(exc).__name__})") from None
    if not any(n.endswith("/archive_format") for n in names):
        raise CifarlabError(f"{path} is a zip file but not a torch.export archive (.pt2)")
    return names


def refuse_pickles(path: Path) -> None:
    """Raise a CifarlabError unless every weight, constant and sample input loads without unpickling code."""
    names = _archive_names(path)
    with zipfile.ZipFile(path) as z:
        for name in names:
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    entries = json.loads(z.read(name)).get("config", {}).values()
                except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                    raise CifarlabError(f"{path}: {name} is not valid JSON") from None
                if any(e.get("use_pickle") or not str(e.get("path_name", "")).startswith(("weight_", "tensor_")) for e in entries):
                    raise CifarlabError(f"refusing to load {path}: it holds pickled objects ({name}); cifarlab never unpickles code")
            elif "/data/sample_inputs/" in name or name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
                    raise CifarlabError(
                        f"refusing to load {path}: {name} needs more than tensors to unpickle ({type(exc).__name__})"
                    ) from None


def pt2_runner(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(run, description)``: ``run(uint8 pixels) -> logits`` through ``torch.export.load``, on the CPU.

    The CPU, where the program was traced: constants the graph creates stay there, so
    moving only its parameters to another device is not a faithful test of that device.
    """
    refuse_pickles(path)
    try:
        module = torch.export.load(str(path)).module()
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways
        raise CifarlabError(f"torch.export.load cannot load {path}: {first_line(exc)}") from None

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(pixels)

    return run, f"torch.export.load, torch {torch.__version__.split('+')[0]}, CPU"
