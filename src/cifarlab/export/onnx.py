"""ONNX export (the dynamo exporter of ``torch.onnx``) and the ONNX Runtime check of it.

The file is one self-contained ``.onnx`` (weights inside, no external data) at opset
:data:`OPSET`, input ``pixels`` (uint8, see :mod:`cifarlab.export.wrapper`), output
``logits``. Its ``metadata_props`` hold the export description as JSON under
``cifarlab`` and, for tools that show plain keys, ``classes``, ``mean``, ``std``,
``input``, ``tta`` and ``cifarlab_version``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from cifarlab.errors import CifarlabError
from cifarlab.export.errors import ExportFailed, first_line
from cifarlab.export.wrapper import INPUT_NAME, OUTPUT_NAME

#: ONNX opset of every export: 20 has Gelu as one operator (the fast nets' activation) and
#: runs on ONNX Runtime >= 1.17, ONNX Runtime Web and mobile included.
OPSET = 20
META_KEY = "cifarlab"


def export_onnx(program: torch.export.ExportedProgram, path: Path, meta: dict[str, Any]) -> None:
    """Write ``program`` (from :func:`cifarlab.export.wrapper.trace`) as ONNX to ``path``."""
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter needs it; say so in one line
    except ImportError:
        raise CifarlabError("ONNX export needs onnx and onnxscript: pip install 'cifarlab[export]'") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter; failures raise
            onnx_program = torch.onnx.export(
                program,
                (),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - any exporter failure is one line, not a traceback
        raise ExportFailed(f"ONNX export of {meta['model']['name']} failed: {first_line(exc)}") from None
    model = onnx_program.model
    model.doc_string = _doc(meta)
    for key, value in _props(meta).items():
        model.metadata_props[key] = value
    onnx_program.save(str(path), external_data=False)


def _props(meta: dict[str, Any]) -> dict[str, str]:
    return {
        META_KEY: json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
        "mean": json.dumps(meta["mean"]),
        "std": json.dumps(meta["std"]),
        "input": "uint8 RGB pixels, NCHW (N, 3, 32, 32), 0..255; normalisation is inside the graph",
        "tta": meta["tta"],
        "cifarlab_version": meta["cifarlab_version"],
    }


def _doc(meta: dict[str, Any]) -> str:
    return (
        f"cifarlab {meta['model']['name']}: {INPUT_NAME} uint8 RGB (N, 3, 32, 32) 0..255 -> {OUTPUT_NAME} "
        f"(N, {len(meta['classes'])}) for classes {', '.join(meta['classes'])}"
    )


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """The cifarlab description stored in an ``.onnx`` file; one-line CifarlabError for anything else."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise CifarlabError("checking an ONNX export needs onnx: pip install 'cifarlab[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise CifarlabError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise CifarlabError(f"{path} is an ONNX model but not a cifarlab export (no '{META_KEY}' metadata)")
    try:
        return json.loads(props[META_KEY])
    except json.JSONDecodeError:
        raise CifarlabError(f"{path}: its '{META_KEY}' metadata is not JSON") from None


def onnx_runner(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(run, description)``: ``run(uint8 pixels) -> logits`` through ONNX Runtime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CifarlabError("verifying an ONNX export needs onnxruntime: pip install 'cifarlab[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no graph-optimisation notices on stderr
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad models
        raise CifarlabError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None
    name = session.get_inputs()[0].name

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: pixels.numpy()})[0])

    return run, f"onnxruntime {ort.__version__}, CPU"
