"""The graph every export holds: raw uint8 pixels in, logits out, normalisation inside.

Input convention (one for ONNX and ``.pt2`` alike): **uint8 RGB pixels, NCHW,
(N, 3, 32, 32), values 0..255**, i.e. a decoded image resized to 32x32 with its
channel axis moved first. uint8 rather than float in [0, 1] because it is what an
image decoder or a canvas hands over, it leaves no doubt about the range (0..1 or
0..255?), and the graph then computes ``(pixels/255 - mean) / std`` with the very
float32 constants and the one fused multiply-add that training used
(:func:`cifarlab.data.normalization`), so its first layer sees bit-identical inputs.

The model inside is built fresh from the checkpoint (:func:`cifarlab.checkpoint.build_model`):
fp32, CPU, eval mode, contiguous memory format, plain ``nn.Conv2d`` layers. The GEMM-conv
path and channels_last are training-speed details and never reach an export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cifarlab.checkpoint import build_model
from cifarlab.data.dataset import IMAGE_SIZE
from cifarlab.data.normalize import apply_normalization, normalization
from cifarlab.engine import predict_logits
from cifarlab.export.errors import ExportFailed, first_line

#: Test-time augmentations an export may bake in (``cifarlab.engine.predict_logits``).
TTAS = ("none", "flip", "flip-translate")

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def input_spec() -> dict[str, Any]:
    """The input convention as it goes into every export's metadata."""
    return {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE],
        "layout": "NCHW",
        "channels": "RGB",
        "range": [0, 255],
        "resize": f"any image: convert to RGB, resize to {IMAGE_SIZE}x{IMAGE_SIZE} with antialiased bilinear "
        "(Pillow Image.BILINEAR), as cifarlab predict does",
        "normalisation": "inside the graph: (pixels/255 - mean) / std",
    }


def hf_input_spec() -> dict[str, Any]:
    """The input of a Hugging Face-style export: the bare model, normalisation outside."""
    return {
        "dtype": "float32",
        "shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE],
        "layout": "NCHW",
        "channels": "RGB",
        "resize": input_spec()["resize"],
        "normalisation": "by the caller: (pixels/255 - mean) / std, e.g. cifarlab.data.normalize(uint8_images, mean, std)",
    }


def output_spec(num_classes: int) -> dict[str, Any]:
    """The output convention as it goes into every export's metadata."""
    return {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", num_classes],
            "meaning": "logits in class order; softmax gives probabilities"}


class ExportModel(nn.Module):
    """``logits = predict_logits(model, (pixels/255 - mean)/std, tta)`` for uint8 ``pixels``.

    ``scale`` and ``shift`` are buffers, so they travel as constants of the graph.
    """

    def __init__(self, model: nn.Module, mean, std, tta: str = "none") -> None:
        super().__init__()
        if tta not in TTAS:
            raise ValueError(f"tta must be one of {TTAS}, got {tta!r}")
        self.model = model
        self.tta = tta
        scale, shift = normalization(mean, std)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) RGB -> float32 (N, num_classes) logits."""
        return predict_logits(self.model, apply_normalization(pixels, self.scale, self.shift), self.tta)


def plain_model(ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's model as exports use it: fresh, fp32, CPU, eval, contiguous."""
    return build_model(ckpt).float().to(memory_format=torch.contiguous_format).eval()


def export_model(ckpt: dict[str, Any], tta: str) -> ExportModel:
    """The graph to export for ``ckpt``: its plain model with normalisation and ``tta`` inside."""
    return ExportModel(plain_model(ckpt), ckpt["mean"], ckpt["std"], tta).eval()


def example_input(batch: int = 2) -> torch.Tensor:
    """A uint8 example batch to trace with (2 by default: a batch of 1 would be specialised)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)


def trace(model: ExportModel, batch: int | None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model``: the batch axis dynamic (``batch`` None) or fixed to ``batch``.

    ONNX and ``.pt2`` are both made from this one program, so they are the same graph.
    """
    example = example_input(batch or 2)
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if batch is None else None
    try:
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is one line, not a traceback
        raise ExportFailed(f"torch.export of {model.model.__class__.__name__} failed: {first_line(exc)}") from None
