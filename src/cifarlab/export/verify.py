"""Proof that an export computes what its checkpoint computes.

On N test images of the run's own data (synthetic images when that data cannot be
reached), the exported model's logits are compared with the checkpoint's in fp32
(:func:`reference_logits`: the plain model, the same normalisation and test-time
augmentation). It passes when the top-1 class agrees on every image and the largest
absolute logit difference is under :data:`TOLERANCE`. The one exception to "agrees" is
a numerical tie: an image whose two leading classes are closer in the checkpoint's own
logits than the export's difference on that image; the line counts those separately.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from cifarlab.errors import CifarlabError
from cifarlab.export.errors import ExportFailed
from cifarlab.export.source import Source

#: Largest absolute logit difference an export may show against its checkpoint.
TOLERANCE = 1e-3
#: Test images verified by default.
DEFAULT_N = 512
_CHUNK = 256


@dataclass
class Images:
    """uint8 (N, 3, 32, 32) images to verify on, what they are, and why (for synthetic ones)."""

    pixels: torch.Tensor
    kind: str  # what they are, as a plural noun: "test images", "synthetic test images", ...
    note: str | None = None


@dataclass
class Verification:
    """The outcome of comparing one export with its checkpoint."""

    fmt: str
    n: int
    agree: int
    ties: int
    tie_gap: float
    max_diff: float
    kind: str
    runner: str

    @property
    def ok(self) -> bool:
        """Top-1 agrees (or ties) on every image and the largest difference is under the tolerance."""
        return self.agree + self.ties == self.n and self.max_diff < TOLERANCE

    def line(self) -> str:
        """``verified onnx: 512 test images, top-1 agrees on 512/512, max |logit diff| 2.1e-06 (...)``"""
        head = "verified" if self.ok else "FAILED"
        ties = f" (+{self.ties} numerical ties, logits within {self.tie_gap:.1e})" if self.ties else ""
        limit = "" if self.ok else f" (must be < {TOLERANCE:g})"
        return (
            f"{head} {self.fmt}: {self.n} {self.kind}, top-1 agrees on {self.agree}/{self.n}{ties}, "
            f"max |logit diff| {self.max_diff:.1e}{limit} ({self.runner})"
        )


def verification_images(src: Source, n: int, data: str | None = None) -> Images:
    """``n`` class-balanced images of the run's evaluation split, or synthetic ones if it is unreachable."""
    from cifarlab.evaluate import load_for_inference

    if n < 1:
        raise CifarlabError(f"--n must be >= 1, got {n}")
    overrides: dict[str, Any] = {"device": "cpu", **({"data": data} if data else {})}
    try:
        ds = load_for_inference(str(src.path), overrides, load_data=True).dataset
    except CifarlabError as exc:
        return synthetic_images(n, f"the run's data is not reachable ({exc})")
    split = ds.test.take(n)
    kind = f"{'synthetic ' if ds.synthetic else ''}{ds.eval_split} images"
    return Images(split.images, kind)


def synthetic_images(n: int, why: str) -> Images:
    """``n`` of cifarlab's procedural images (fixed seed): image-like, unlike uniform noise."""
    from cifarlab.data.synthetic import generate_synthetic

    pixels, _ = generate_synthetic(n, 10, torch.Generator().manual_seed(0))
    return Images(pixels, "generated images", f"{why}; verifying on {n} generated images instead")


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 on CUDA while verifying: its 10-bit mantissa alone can exceed the tolerance."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, batch: int | None) -> torch.Tensor:
    """``fn`` over ``pixels`` in chunks; a fixed ``batch`` pads the last chunk and drops the padding."""
    size = batch or _CHUNK
    out = []
    for start in range(0, len(pixels), size):
        chunk = pixels[start : start + size]
        real = len(chunk)
        if batch and real < batch:
            chunk = torch.cat([chunk, chunk.new_zeros((batch - real, *chunk.shape[1:]))])
        out.append(torch.as_tensor(fn(chunk))[:real].float().cpu())
    return torch.cat(out)


def reference_logits(src: Source, pixels: torch.Tensor, tta: str, device: str = "cpu") -> torch.Tensor:
    """The checkpoint's fp32 logits for uint8 ``pixels``: plain model, normalisation, ``tta``."""
    from cifarlab.data.normalize import normalize
    from cifarlab.engine import predict_logits
    from cifarlab.export.wrapper import plain_model

    model = plain_model(src.ckpt).to(device)
    mean, std = src.ckpt["mean"], src.ckpt["std"]
    with torch.no_grad(), exact_fp32():
        return run_batched(lambda x: predict_logits(model, normalize(x, mean, std, device), tta), pixels, None)


def compare(fmt: str, exported: torch.Tensor, reference: torch.Tensor, kind: str, runner: str) -> Verification:
    """Compare an export's logits with the checkpoint's (both (N, classes), float)."""
    if exported.shape != reference.shape:
        raise ExportFailed(
            f"{fmt}: the export returned logits of shape {tuple(exported.shape)}, the checkpoint {tuple(reference.shape)}"
        )
    diff = (exported.double() - reference.double()).abs()
    per_image = diff.amax(1)
    ref_top, exp_top = reference.argmax(1), exported.argmax(1)
    differ = ref_top != exp_top
    rows = torch.arange(len(reference))
    gap = (reference[rows, ref_top] - reference[rows, exp_top]).double()
    tie = differ & (gap <= 2 * per_image)
    return Verification(
        fmt=fmt,
        n=len(reference),
        agree=int((~differ).sum()),
        ties=int(tie.sum()),
        tie_gap=float(gap[tie].max()) if tie.any() else 0.0,
        max_diff=float(diff.max()) if diff.numel() else 0.0,
        kind=kind,
        runner=runner,
    )
