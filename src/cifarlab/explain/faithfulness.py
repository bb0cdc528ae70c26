"""Is a CAM meaningful? A deletion check: mask what it highlights, see if the model cares.

For each image, the most-highlighted ``fraction`` of pixels (by the CAM of the predicted
class) are set to the dataset mean -- zero after normalisation, the same fill the
training augmentations use -- and the drop in the predicted class's probability is
measured. The same is done with an equal number of pixels in random blobs. A CAM that
points at the evidence the model uses causes a clearly larger drop than random masking;
one that is noise does not.

The random mask is shaped like a CAM mask -- the top ``fraction`` of a coarse random map
upsampled bilinearly -- not scattered single pixels: salt-and-pepper holes all over the
image are far from anything a CNN saw in training and hurt every prediction more than
one contiguous hole does, so they made even good maps look "no better than random".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# Fixed so reports are reproducible; a private generator keeps the global RNG untouched.
_RANDOM_MASK_SEED = 1234
# Side of the coarse random map behind the random mask: the default CAM layers give
# 8x8 (ResNets' layer3) to 15x15 (fast nets' group1) maps on 32x32 inputs, so 8x8 blobs are
# no finer than a CAM.
_RANDOM_GRID = 8


@dataclass(frozen=True)
class Faithfulness:
    """Mean probability drops over one gallery (probability units, 0..1)."""

    n: int
    fraction: float
    cam_drop: float  # mean drop when the top-CAM pixels are masked
    random_drop: float  # mean drop when as many pixels in random blobs are masked
    cam_wins: float  # share of images where the CAM mask hurts more than the random one

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def top_fraction_mask(cams: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, H, W) bool: the ``fraction`` highest-valued pixels of each map (ties by position)."""
    b = cams.shape[0]
    flat = cams.reshape(b, -1)
    k = max(1, round(fraction * flat.shape[1]))
    top = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return mask.view_as(cams)


def random_mask(
    shape: tuple[int, int, int], fraction: float, seed: int = _RANDOM_MASK_SEED, grid: int = _RANDOM_GRID
) -> torch.Tensor:
    """(B, H, W) bool with exactly ``fraction`` of each image's pixels set, in random blobs.

    Built like a CAM mask: uniform noise on a ``grid`` x ``grid`` map, upsampled
    bilinearly to (H, W), then its top ``fraction`` (:func:`top_fraction_mask`).
    """
    b, h, w = shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 1, min(grid, h), min(grid, w), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return top_fraction_mask(smooth[:, 0], fraction)


@torch.inference_mode()
def _class_probs(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], batch_size):
        p = model(x[i : i + batch_size]).float().softmax(1)
        out.append(p.gather(1, classes[i : i + batch_size].view(-1, 1)).flatten())
    return torch.cat(out).cpu()


def deletion_check(
    model: nn.Module,
    images: torch.Tensor,
    cams: torch.Tensor,
    classes: torch.Tensor,
    fraction: float = 0.2,
    batch_size: int = 256,
) -> Faithfulness:
    """Probability drop of ``classes`` when the top-``fraction`` CAM pixels vs random blobs are masked.

    ``images`` are normalised (B, 3, H, W) inputs on the model's device; ``cams`` (B, H, W)
    at image resolution. The model runs in eval mode (restored afterwards), fp32.
    """
    n = images.shape[0]
    if n == 0:
        return Faithfulness(0, fraction, float("nan"), float("nan"), float("nan"))
    was_training = model.training
    model.eval()
    try:
        device = images.device
        classes = classes.to(device).long()
        cam_mask = top_fraction_mask(cams.float().cpu(), fraction).to(device).unsqueeze(1)
        rnd_mask = random_mask(tuple(cams.shape), fraction).to(device).unsqueeze(1)
        base = _class_probs(model, images, classes, batch_size)
        cam_p = _class_probs(model, images.masked_fill(cam_mask, 0.0), classes, batch_size)
        rnd_p = _class_probs(model, images.masked_fill(rnd_mask, 0.0), classes, batch_size)
    finally:
        model.train(was_training)
    cam_drop = base - cam_p
    rnd_drop = base - rnd_p
    return Faithfulness(
        n=n,
        fraction=fraction,
        cam_drop=cam_drop.mean().item(),
        random_drop=rnd_drop.mean().item(),
        cam_wins=(cam_drop > rnd_drop).float().mean().item(),
    )
