"""What an export is made from, and the metadata that ties every export back to it.

``SOURCE`` is a run directory (its ``checkpoints/last.pt``: the final weights with the
run's history, the same weights as its ``model.safetensors``) or a checkpoint file
(``.pt`` or ``.safetensors``). Every export carries :func:`export_metadata`: classes,
mean/std, the input convention, the cifarlab version, and the source checkpoint's path
(relative to the export, so a run directory that moves keeps working) with a sha256 of
its weights, so that ``cifarlab export --check`` can find the checkpoint again and know
it is still the same one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifarlab.checkpoint import read_checkpoint
from cifarlab.errors import CifarlabError
from cifarlab.rundir import CHECKPOINTS, RunDir

#: ``format`` of the metadata dict; ``METADATA_VERSION`` changes when its keys do.
METADATA_FORMAT = "cifarlab-export"
METADATA_VERSION = 1
#: Where exports go inside a run directory unless ``--out`` says otherwise.
EXPORT_DIR = "export"


@dataclass
class Source:
    """A checkpoint read for export: its path, its run directory (if any) and its contents."""

    path: Path
    run_dir: Path | None
    ckpt: dict[str, Any]

    @property
    def weights_sha256(self) -> str:
        """Hash of the weights alone (see :func:`weights_sha256`)."""
        return weights_sha256(self.ckpt["state_dict"])

    def default_out(self) -> Path:
        """``RUN_DIR/export`` (or ``export/`` beside a checkpoint outside a run directory)."""
        return (self.run_dir or self.path.parent) / EXPORT_DIR


def open_source(source: str | os.PathLike) -> Source:
    """Read ``source`` (run directory or checkpoint file); one-line CifarlabError if it is neither."""
    path = Path(source)
    if path.is_dir():
        rd = RunDir(path)
        for candidate in (rd.last, rd.weights):
            if candidate.is_file():
                return Source(candidate, path, read_checkpoint(candidate))
        raise CifarlabError(f"{path} is not a run directory: it has neither {CHECKPOINTS}/last.pt nor model.safetensors")
    if not path.exists():
        raise CifarlabError(f"{path}: no such run directory or checkpoint")
    return Source(path, owning_run_dir(path), read_checkpoint(path))


def owning_run_dir(ckpt_path: Path) -> Path | None:
    """The run directory a checkpoint sits in (``RUN/checkpoints/x.pt``, ``RUN/model.safetensors``), if any."""
    folder = ckpt_path.parent.parent if ckpt_path.parent.name == CHECKPOINTS else ckpt_path.parent
    return folder if RunDir(folder).last.is_file() or RunDir(folder).config.is_file() else None


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the weights' names, dtypes, shapes and bytes, in name order.

    A hash of the tensors rather than of the file: ``last.pt`` and ``model.safetensors`` of
    one run hold the same weights in different files and must hash the same.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_metadata(src: Source, *, export_path: Path, fmt: str, tta: str, batch: int | None) -> dict[str, Any]:
    """The description every export carries (JSON-serialisable)."""
    from cifarlab import __version__
    from cifarlab.export.wrapper import hf_input_spec, input_spec, output_spec

    ckpt = src.ckpt
    dataset = ckpt.get("dataset") or {}
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
        "export_format": fmt,
        "cifarlab_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "model": {"name": ckpt["model"]["name"], "kwargs": ckpt["model"]["kwargs"]},
        "classes": list(ckpt["classes"]),
        "mean": [float(v) for v in ckpt["mean"]],
        "std": [float(v) for v in ckpt["std"]],
        "input": hf_input_spec() if fmt == "hf" else input_spec(),
        "output": output_spec(len(ckpt["classes"])),
        "tta": tta,
        "batch": "dynamic" if batch is None else int(batch),
        "dataset": {"name": dataset.get("name"), "synthetic": bool(dataset.get("synthetic"))},
        "epoch": ckpt.get("epoch"),
        "source": {
            # Relative to the folder the export sits in: a run directory moved as a whole still checks.
            "checkpoint": os.path.relpath(src.path.resolve(), export_path.resolve().parent),
            "weights_sha256": src.weights_sha256,
        },
    }


def source_of(meta: dict[str, Any], export_path: Path, override: str | os.PathLike | None) -> Source:
    """The checkpoint an export was made from: ``override`` if given, else the one its metadata names.

    Refuses (one line) a checkpoint whose weights are not the ones exported.
    """
    if override is not None:
        src = open_source(override)
    else:
        stored = (meta.get("source") or {}).get("checkpoint")
        if not stored:
            raise CifarlabError(f"{export_path}'s metadata names no source checkpoint; give it: cifarlab export --check PATH SOURCE")
        path = (export_path.resolve().parent / stored).resolve()
        if not path.is_file():
            raise CifarlabError(
                f"the checkpoint {export_path} was exported from is gone ({path}); give it: cifarlab export --check PATH SOURCE"
            )
        src = Source(path, owning_run_dir(path), read_checkpoint(path))
    expected = (meta.get("source") or {}).get("weights_sha256")
    if expected and src.weights_sha256 != expected:
        raise CifarlabError(
            f"{src.path} holds other weights than the ones {export_path} was exported from (sha256 differs); "
            "give the original checkpoint: cifarlab export --check PATH SOURCE"
        )
    return src
