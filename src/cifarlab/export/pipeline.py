"""Export a checkpoint to ONNX, ``.pt2`` and a Hugging Face-style folder, each one verified.

Every output is written under a temporary name in the output folder, verified against
the checkpoint (:mod:`cifarlab.export.verify`), and only then moved to its name. An
output that fails is deleted (together with an older export of the same name, which
would otherwise pass for the result) and the command fails with the numbers, after
the other formats have had their turn.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cifarlab.errors import CifarlabError
from cifarlab.export.errors import ExportFailed
from cifarlab.export.source import METADATA_FORMAT, Source, export_metadata, open_source, source_of
from cifarlab.export.verify import DEFAULT_N, Images, Verification, compare, reference_logits, run_batched, verification_images

#: Formats in the order they are written (the model card lists the verifications before it).
FORMATS = ("onnx", "pt2", "hf")
#: The name of each format's output inside the output folder.
OUTPUT_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "hf": "hf"}

Log = Callable[[str], None]


@dataclass
class Exported:
    """One verified export."""

    fmt: str
    path: Path
    verification: Verification


@dataclass
class _Job:
    """What every format's export shares: the source, the checked images and the reference logits."""

    src: Source
    out: Path
    tta: str
    batch: int | None
    images: Images
    reference: torch.Tensor
    device: str
    data: str | None
    program: Any = None  # the torch.export program, made once for onnx and pt2


def export_source(
    source: str | os.PathLike,
    formats: Sequence[str],
    *,
    out: str | os.PathLike | None = None,
    batch: int | None = None,
    n: int = DEFAULT_N,
    device: str = "cpu",
    tta: str | None = None,
    data: str | None = None,
    log: Log = print,
) -> list[Exported]:
    """Export ``source`` (run directory or checkpoint) in each of ``formats``; see the module docstring.

    Returns the verified exports; raises :class:`ExportFailed` (exit 4) if any failed.
    """
    from cifarlab.export.wrapper import TTAS, export_model, trace

    wanted = _formats(formats)
    if batch is not None and batch < 1:
        raise CifarlabError(f"--batch must be a positive number or 'dynamic', got {batch}")
    src = open_source(source)
    tta = tta or (src.ckpt.get("config") or {}).get("tta") or "none"
    if tta not in TTAS:
        raise CifarlabError(f"--tta must be one of {', '.join(TTAS)}, got {tta!r}")
    out_dir = Path(out) if out is not None else src.default_out()
    for fmt in wanted:
        _check_destination(out_dir / OUTPUT_NAMES[fmt], fmt)
    device = _device(device)
    images = verification_images(src, n, data)
    if images.note:
        log(f"note: {images.note}")
    job = _Job(src, out_dir, tta, batch, images, reference_logits(src, images.pixels, tta, device), device, data)
    if "onnx" in wanted or "pt2" in wanted:
        job.program = trace(export_model(src.ckpt, tta), batch)
    _prepare_out(out_dir)
    done: list[Exported] = []
    failed: list[str] = []
    for fmt in wanted:
        result = _export_one(job, fmt, [e.verification.line() for e in done])
        log(result.verification.line())
        if result.verification.ok:
            done.append(result)
            log(f"wrote {result.path}")
        else:
            failed.append(f"{result.verification.line()}; {result.path} deleted")
    if failed:
        raise ExportFailed(" | ".join(failed))
    return done


def _prepare_out(out_dir: Path) -> None:
    """Create the output folder and drop what exports killed mid-write left behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarlabError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    for stale in out_dir.glob(".tmp-*-*"):
        _, pid, name = stale.name.split("-", 2)
        if name in OUTPUT_NAMES.values() and pid.isdigit() and not _alive(int(pid)):
            _remove(stale)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (an export running beside this one keeps its temp files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _formats(formats: Sequence[str]) -> list[str]:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CifarlabError(f"unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    if not formats:
        raise CifarlabError(f"give at least one --format ({', '.join(FORMATS)})")
    return [f for f in FORMATS if f in formats]


def _device(name: str) -> str:
    from cifarlab.runtime import resolve_device

    return str(resolve_device(name or "cpu"))


def _check_destination(dest: Path, fmt: str) -> None:
    """Refuse to replace anything but an earlier export of the same kind."""
    if fmt == "hf":
        if dest.exists() and not (dest.is_dir() and _is_hf_export(dest)):
            raise CifarlabError(f"refusing to replace {dest}: it exists and is not a cifarlab export; choose another --out")
    elif dest.is_dir():
        raise CifarlabError(f"{dest} is a folder; choose another --out")


def _is_hf_export(folder: Path) -> bool:
    from cifarlab.pretrained import read_config

    try:
        read_config(folder)
    except CifarlabError:
        return not any(folder.iterdir())  # an empty folder may be filled
    return True


def _export_one(job: _Job, fmt: str, earlier: list[str]) -> Exported:
    """Write ``fmt`` under a temporary name, verify it, move it into place (or delete it)."""
    dest = job.out / OUTPUT_NAMES[fmt]
    tmp = job.out / f".tmp-{os.getpid()}-{dest.name}"  # same suffix: torch.export.load wants .pt2
    meta = export_metadata(job.src, export_path=dest / "config.json" if fmt == "hf" else dest, fmt=fmt,
                           tta=job.tta, batch=job.batch)
    try:
        _write(job, fmt, tmp, meta)
        verification = verify_path(fmt, tmp, job.images, job.reference, job.batch, job.device)
        if verification.ok and fmt == "hf":
            _write_card(job, tmp, meta, earlier + [verification.line()])
        if verification.ok:
            _replace(tmp, dest)
    finally:
        _remove(tmp)
    if not verification.ok:
        _remove(dest)
    return Exported(fmt, dest, verification)


def _write(job: _Job, fmt: str, path: Path, meta: dict[str, Any]) -> None:
    try:
        if fmt == "onnx":
            from cifarlab.export.onnx import export_onnx

            export_onnx(job.program, path, meta)
        elif fmt == "pt2":
            from cifarlab.export.pt2 import export_pt2

            export_pt2(job.program, path, meta)
        else:
            from cifarlab.export.hf import write_hf

            write_hf(job.src.ckpt, path, meta)
    except OSError as exc:
        raise CifarlabError(f"cannot write the {fmt} export in {job.out}: {exc.strerror or exc}") from None


def _write_card(job: _Job, folder: Path, meta: dict[str, Any], lines: list[str]) -> None:
    from cifarlab.export.card import render_card
    from cifarlab.export.hf import write_card
    from cifarlab.export.results import card_results
    from cifarlab.export.wrapper import plain_model

    results = card_results(job.src, job.tta, device=job.device, data=job.data)
    params = sum(p.numel() for p in plain_model(job.src.ckpt).parameters())
    write_card(folder, render_card(meta, job.src.ckpt, results, lines, params))


def verify_path(fmt: str, path: Path, images: Images, reference: torch.Tensor, batch: int | None, device: str) -> Verification:
    """Run the export at ``path`` on ``images`` and compare with ``reference``."""
    if fmt == "onnx":
        from cifarlab.export.onnx import onnx_runner

        run, runner = onnx_runner(path)
    elif fmt == "pt2":
        from cifarlab.export.pt2 import pt2_runner

        run, runner = pt2_runner(path)
    else:
        from cifarlab.export.hf import hf_runner

        run, runner = hf_runner(path, device)
        batch = None  # the bare model takes any batch
    return compare(fmt, run_batched(run, images.pixels, batch), reference, images.kind, runner)


def _replace(tmp: Path, dest: Path) -> None:
    if dest.is_dir():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_export(
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    n: int = DEFAULT_N,
    device: str = "cpu",
    data: str | None = None,
    log: Log = print,
) -> Verification:
    """Verify an existing export again against the checkpoint its metadata names (or ``source``).

    Raises :class:`ExportFailed` (exit 4) if it no longer agrees; the export is left in place.
    """
    path = Path(path)
    fmt, meta = read_export_metadata(path)
    src = source_of(meta, path / "config.json" if fmt == "hf" else path, source)
    device = _device(device)
    images = verification_images(src, n, data)
    if images.note:
        log(f"note: {images.note}")
    tta = meta.get("tta", "none")
    batch = meta.get("batch")
    reference = reference_logits(src, images.pixels, tta, device)
    verification = verify_path(fmt, path, images, reference, batch if isinstance(batch, int) else None, device)
    log(verification.line())
    if not verification.ok:
        raise ExportFailed(verification.line())
    return verification


def read_export_metadata(path: Path) -> tuple[str, dict[str, Any]]:
    """``(format, metadata)`` of an export at ``path``; one-line CifarlabError for anything else."""
    if not path.exists():
        raise CifarlabError(f"{path}: no such file or folder")
    if path.is_dir():
        from cifarlab.export.hf import read_hf_metadata

        fmt, meta = "hf", read_hf_metadata(path)
    elif path.suffix == ".onnx":
        from cifarlab.export.onnx import read_onnx_metadata

        fmt, meta = "onnx", read_onnx_metadata(path)
    elif path.suffix == ".pt2":
        from cifarlab.export.pt2 import read_pt2_metadata

        fmt, meta = "pt2", read_pt2_metadata(path)
    else:
        raise CifarlabError(f"cannot tell what {path} is: --check takes a .onnx file, a .pt2 file or an hf export folder")
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise CifarlabError(f"{path} carries no cifarlab export metadata")
    return fmt, meta
