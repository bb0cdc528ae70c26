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

import warnings
from dataclasses import asdict, dataclass

import numpy as np
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


# ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
# Methods"): remove a share of the pixels -- most relevant first (MoRF) or least relevant
# first (LeRF) -- and fill them by noisy linear imputation from their neighbours, which
# leaves no tell-tale mask shape for the model to react to. A faithful map: a large drop
# when its top pixels go (MoRF), a small one when its bottom pixels go (LeRF).
ROAD_REMOVED = (0.2, 0.4, 0.6, 0.8)  # shares of the pixels removed
_ROAD_SEED = 4321  # the imputation's noise, drawn from a forked RNG: reproducible, global RNG untouched


@dataclass(frozen=True)
class Road:
    """Mean drops of the explained class's probability under ROAD, per share of pixels removed."""

    n: int
    removed: tuple[float, ...]
    morf_drop: tuple[float, ...]  # most relevant pixels removed first: large = faithful
    lerf_drop: tuple[float, ...]  # least relevant pixels removed first: small = faithful

    @property
    def morf_mean(self) -> float:
        """MoRF drop averaged over the shares removed."""
        return float(np.mean(self.morf_drop)) if self.morf_drop else float("nan")

    @property
    def lerf_mean(self) -> float:
        """LeRF drop averaged over the shares removed."""
        return float(np.mean(self.lerf_drop)) if self.lerf_drop else float("nan")

    def to_dict(self) -> dict:
        """Plain dict for JSON (with the two means)."""
        return {**asdict(self), "morf_mean": self.morf_mean, "lerf_mean": self.lerf_mean}


def _tie_free(cams: torch.Tensor, seed: int) -> np.ndarray:
    """Each map replaced by its pixels' ranks scaled to [0, 1], ties in a fixed random order.

    ROAD thresholds a map at a percentile; a map that is 0 on half the image (relu) would
    otherwise have all those pixels removed together or not at all, so "remove 20%" could
    remove 50%. Ranks keep the map's order and make every share exact.
    """
    b = cams.shape[0]
    flat = cams.reshape(b, -1).float().cpu().numpy()
    tiebreak = np.random.default_rng(seed).random(flat.shape[1])
    ranks = np.empty_like(flat)
    for i in range(b):
        order = np.lexsort((tiebreak, flat[i]))
        ranks[i, order] = np.arange(flat.shape[1]) / max(1, flat.shape[1] - 1)
    return ranks.reshape(tuple(cams.shape)).astype(np.float32)


def road_check(
    model: nn.Module,
    images: torch.Tensor,
    cams: torch.Tensor,
    classes: torch.Tensor,
    removed: tuple[float, ...] = ROAD_REMOVED,
    batch_size: int = 256,
) -> Road:
    """ROAD most/least-relevant-first drops of ``classes``' probability (pytorch-grad-cam's metrics).

    ``images`` are normalised (B, 3, H, W) inputs on the model's device; ``cams`` (B, H, W)
    at image resolution. The model runs in eval mode (restored afterwards), fp32.
    """
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    n = images.shape[0]
    if n == 0:
        return Road(0, tuple(removed), (), ())
    ranks = _tie_free(cams, _ROAD_SEED)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes.tolist()]
    was_training = model.training
    model.eval()
    morf, lerf = [], []
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # The library's imputer calls np.argwhere on torch tensors: NumPy 2 warns once per image.
            warnings.filterwarnings("ignore", message="__array_wrap__ must accept context", category=DeprecationWarning)
            torch.manual_seed(_ROAD_SEED)
            for share in removed:
                # The library keeps the pixels below the given percentile of the map (MoRF)
                # or of its complement (LeRF) and imputes the rest.
                pct = 100.0 * (1.0 - share)
                for metric, out in ((ROADMostRelevantFirst(pct), morf), (ROADLeastRelevantFirst(pct), lerf)):
                    changes = [
                        metric(images[i : i + batch_size], ranks[i : i + batch_size], targets[i : i + batch_size], model)
                        for i in range(0, n, batch_size)
                    ]
                    out.append(-float(np.concatenate(changes).mean()))  # change = after - before; drop = -change
    finally:
        model.train(was_training)
    return Road(n, tuple(removed), tuple(morf), tuple(lerf))
