"""Batched, on-device data augmentation for normalized image batches.

Every sample gets its own random parameters, drawn in a few batched calls from a
caller-supplied generator that lives on the batch's device. Nothing here loops over
samples, calls ``.item()`` or otherwise synchronises with the host, so the same code
is correct and fast on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CifarlabError

# Defaults when an op is named without a value: the standard CIFAR recipe
# (4 px pad-and-crop, He et al. 2016; 16 px cutout, DeVries & Taylor 2017) and a mild
# rotation that keeps 32x32 content recognisable.
DEFAULT_CROP_PAD = 4
DEFAULT_CUTOUT = 16
DEFAULT_ROTATE = 5.0
# Per-image brightness shift and contrast scale, in units of the normalised data (one
# channel standard deviation): the 2025 CIFAR-10 speed-run record (hiverge/cifar10-speedrun)
# added about +-0.14 and +-0.13 to airbench94_muon's flip and translate.
DEFAULT_BRIGHTNESS = 0.1
DEFAULT_CONTRAST = 0.1

_USAGE = (
    'use e.g. "crop,flip,cutout", "crop:4,flip,cutout:16,rotate:5", "translate:2,flip:alt", '
    '"translate:2,flip:alt,brightness:0.14,contrast:0.13" or "none"'
)


@dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations to apply (all off by default); applied as crop -> flip -> rotate -> colour -> cutout.

    Attributes:
        crop_pad: random 32x32 crop of the image zero-padded by this many pixels per side; 0 = off.
        crop_reflect: pad by reflection instead of zeros ("translate:N" in text form, the
            speed-runs' random translation: no flat grey borders for the net to learn).
        flip: horizontal flip with probability 0.5.
        flip_alternate: "flip:alt". Each image is flipped at random in the first epoch and
            then every other epoch it is the mirror of the epoch before, so any two
            consecutive epochs show both orientations (airbench's alternating flip; it
            needs per-image state, so :class:`DeviceLoader` supplies the flips).
        cutout: side of a zeroed square at a uniformly random centre (it may hang off the
            image, as in DeVries & Taylor 2017); 0 = off.
        rotate: rotation by a uniform angle in [-rotate, +rotate] degrees (bilinear, zero fill); 0 = off.
        brightness: add one uniform offset in [-brightness, +brightness] to every pixel of an
            image, in normalised units (0.1 = a tenth of a channel's standard deviation); 0 = off.
        contrast: then scale the image by a uniform factor in [1 - contrast, 1 + contrast]
            (about the dataset mean, which is 0 after normalisation); 0 = off, at most 1.
    """

    crop_pad: int = 0
    flip: bool = False
    cutout: int = 0
    rotate: float = 0.0
    crop_reflect: bool = False
    flip_alternate: bool = False
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            raise CifarlabError(f"augment crop padding must be an integer >= 0, got {self.crop_pad!r}")
        if isinstance(self.cutout, bool) or not isinstance(self.cutout, int) or self.cutout < 0:
            raise CifarlabError(f"augment cutout size must be an integer >= 0, got {self.cutout!r}")
        if not isinstance(self.flip, bool):
            raise CifarlabError(f"augment flip must be true or false, got {self.flip!r}")
        if not isinstance(self.crop_reflect, bool) or not isinstance(self.flip_alternate, bool):
            raise CifarlabError("augment crop_reflect and flip_alternate must be true or false")
        if self.flip_alternate and not self.flip:
            raise CifarlabError("augment flip_alternate needs flip")
        rotate = self.rotate
        if isinstance(rotate, bool) or not isinstance(rotate, (int, float)) or not (0.0 <= rotate <= 180.0):
            raise CifarlabError(f"augment rotation must be a number of degrees in [0, 180], got {rotate!r}")
        object.__setattr__(self, "rotate", float(rotate))
        for name, limit in (("brightness", 10.0), ("contrast", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= limit):
                raise CifarlabError(f"augment {name} must be a number in [0, {limit:g}], got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return (
            self.crop_pad > 0 or self.flip or self.cutout > 0 or self.rotate > 0
            or self.brightness > 0 or self.contrast > 0
        )

    def __str__(self) -> str:
        """Canonical text form; ``AugmentSpec.parse(str(spec)) == spec``."""
        parts = []
        if self.crop_pad:
            parts.append(f"{'translate' if self.crop_reflect else 'crop'}:{self.crop_pad}")
        if self.flip:
            parts.append("flip:alt" if self.flip_alternate else "flip")
        if self.rotate:
            parts.append(f"rotate:{self.rotate:g}")
        if self.brightness:
            parts.append(f"brightness:{self.brightness:g}")
        if self.contrast:
            parts.append(f"contrast:{self.contrast:g}")
        if self.cutout:
            parts.append(f"cutout:{self.cutout}")
        return ",".join(parts) or "none"

    @classmethod
    def parse(cls, text: str) -> "AugmentSpec":
        """Parse ``"crop,flip,cutout"``, ``"crop:4,flip,cutout:16,rotate:5"``, ``"translate:2,flip:alt"`` or ``"none"``.

        ``translate:N`` is ``crop:N`` with reflection padding; ``flip:alt`` alternates each
        image's flip between epochs. Ops may come in any order (they are always applied crop -> flip -> rotate -> cutout);
        a value of 0 switches an op off. Unknown ops, repeated ops and bad values raise
        :class:`CifarlabError`.
        """
        raw = str(text).strip().lower()
        if raw in ("", "none"):
            return cls()
        fields: dict[str, object] = {}
        for token in raw.split(","):
            token = token.strip()
            name, sep, value = token.partition(":")
            name, value = name.strip(), value.strip()
            if sep and not value:
                raise CifarlabError(f"augment op {token!r} has an empty value; {_USAGE}")
            if name in fields:
                raise CifarlabError(f"augment op {name!r} given twice in {text!r}; {_USAGE}")
            if name in ("crop", "translate"):
                if "crop" in fields:
                    raise CifarlabError(f"give one of 'crop' and 'translate' in {text!r}, not both; {_USAGE}")
                fields["crop"] = _int_value(name, value, DEFAULT_CROP_PAD)
                fields["crop_reflect"] = name == "translate"
            elif name == "cutout":
                fields[name] = _int_value(name, value, DEFAULT_CUTOUT)
            elif name == "rotate":
                fields[name] = _float_value(name, value, DEFAULT_ROTATE)
            elif name == "brightness":
                fields[name] = _float_value(name, value, DEFAULT_BRIGHTNESS, limit=10.0, unit="normalised units")
            elif name == "contrast":
                fields[name] = _float_value(name, value, DEFAULT_CONTRAST, limit=1.0, unit="a fraction")
            elif name == "flip":
                if value and value != "alt":
                    raise CifarlabError(f"augment op 'flip' takes no value or 'alt', got {token!r}; {_USAGE}")
                fields[name] = True
                fields["flip_alternate"] = value == "alt"
            elif name == "none":
                raise CifarlabError(f"'none' cannot be combined with other augment ops in {text!r}")
            else:
                raise CifarlabError(f"unknown augment op {name!r} in {text!r}; known: crop, translate, flip, rotate, brightness, contrast, cutout; {_USAGE}")
        return cls(
            crop_pad=int(fields.get("crop", 0)),  # type: ignore[arg-type]
            crop_reflect=bool(fields.get("crop_reflect", False)),
            flip=bool(fields.get("flip", False)),
            flip_alternate=bool(fields.get("flip_alternate", False)),
            cutout=int(fields.get("cutout", 0)),  # type: ignore[arg-type]
            rotate=float(fields.get("rotate", 0.0)),  # type: ignore[arg-type]
            brightness=float(fields.get("brightness", 0.0)),  # type: ignore[arg-type]
            contrast=float(fields.get("contrast", 0.0)),  # type: ignore[arg-type]
        )


def _int_value(name: str, value: str, default: int) -> int:
    if not value:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise CifarlabError(f"augment op {name!r} needs a whole number of pixels, got {value!r}; {_USAGE}") from None
    if parsed < 0:
        raise CifarlabError(f"augment op {name!r} must be >= 0, got {parsed}")
    return parsed


def _float_value(name: str, value: str, default: float, *, limit: float = 180.0, unit: str = "degrees") -> float:
    if not value:
        return default
    try:
        parsed = float(value)
    except ValueError:
        raise CifarlabError(f"augment op {name!r} needs a number ({unit}), got {value!r}; {_USAGE}") from None
    if not math.isfinite(parsed) or not 0.0 <= parsed <= limit:
        raise CifarlabError(f"augment op {name!r} must be in [0, {limit:g}] ({unit}), got {value!r}")
    return parsed


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def augment_batch(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """Augment a normalized float batch (B,C,H,W); returns a new tensor of the same shape, dtype and layout.

    Zero is the dataset's mean colour after normalisation, so zero padding, rotation fill
    and cutout all fill with the mean. ``generator`` must live on ``x.device``; the
    same generator state always gives the same output. ``flips`` (B,) bool, on the
    device, says which samples to mirror instead of drawing it (required when
    ``spec.flip_alternate``, where the caller knows each image's flip history).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augment_batch expects a float (B,C,H,W) batch, got {x.dtype} {tuple(x.shape)}")
    fmt = _memory_format(x)
    out = x
    if spec.flip_alternate and flips is None:
        raise ValueError("flip:alt needs the per-sample flips from the loader")
    if spec.crop_pad > 0 or spec.flip:
        out = _crop_flip(out, spec.crop_pad, spec.flip, generator, reflect=spec.crop_reflect, flips=flips)
    if spec.rotate > 0:
        out = _rotate(out, spec.rotate, generator)
    if spec.brightness > 0 or spec.contrast > 0:
        out = _colour(out, spec.brightness, spec.contrast, generator, inplace=out is not x)
    if spec.cutout > 0:
        # In place when `out` is already our own buffer (saves one batch-sized copy).
        out = _cutout(out, spec.cutout, generator, inplace=out is not x)
    if out is x:
        return x.clone(memory_format=fmt)
    return out.contiguous(memory_format=fmt)


def _crop_flip(
    x: torch.Tensor, pad: int, flip: bool, g: torch.Generator, *, reflect: bool = False, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """Random crop from the padded image and horizontal flip, as ONE gather.

    Output pixel (i, j) reads input (i + oy - pad, c(j) + ox - pad), where c(j) is j or,
    for flipped samples, W-1-j (flipping the crop = reading its columns backwards);
    reads outside the image give 0, which is exactly the zero padding, or with
    ``reflect`` read the mirrored pixel (-1 -> 1, W -> W-2, like ``F.pad(mode="reflect")``).
    No padded copy of the batch is ever made.
    """
    b, _, h, w = x.shape
    dev = x.device
    if reflect and pad >= min(h, w):
        raise CifarlabError(f"translate:{pad} needs images larger than {pad} pixels per side, got {h}x{w}")
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=g, device=dev) - pad
        oy, ox = offsets[:, 0:1], offsets[:, 1:2]
    else:
        oy = ox = torch.zeros(b, 1, dtype=torch.long, device=dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        flipped = flips.view(b, 1) if flips is not None else torch.rand(b, 1, generator=g, device=dev) < 0.5
        cols = torch.where(flipped, (w - 1) - cols, cols)
    rows = torch.arange(h, device=dev).view(1, h) + oy  # (B,H)
    cols = cols + ox  # (B,W)
    if reflect:  # valid for pad < size: one reflection brings every index back inside
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
    flat = rows.clamp(0, h - 1).unsqueeze(2) * w + cols.clamp(0, w - 1).unsqueeze(1)  # (B,H,W)
    gathered = x.reshape(b, x.shape[1], h * w).gather(2, flat.view(b, 1, h * w).expand(-1, x.shape[1], -1))
    if reflect:  # every read is inside the image: nothing to zero
        return gathered.view_as(x)
    valid = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)  # (B,H,W)
    return gathered.view_as(x).masked_fill_(~valid.unsqueeze(1), 0.0)


def _rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    """Rotate each sample about the image centre by its own uniform angle in [-degrees, degrees]."""
    b, _, h, w = x.shape
    angle = (torch.rand(b, generator=g, device=x.device, dtype=torch.float32) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    # affine_grid works in [-1, 1] coordinates per axis; the h/w factors make the map a
    # true rotation in pixel space when the image is not square.
    theta = torch.stack(
        [torch.stack([cos, -sin * (h / w), zero], 1), torch.stack([sin * (w / h), cos, zero], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _colour(x: torch.Tensor, brightness: float, contrast: float, g: torch.Generator, *, inplace: bool) -> torch.Tensor:
    """``(x + shift) * scale`` with one shift and one scale per sample (uniform, see AugmentSpec).

    Applied before cutout, so cutout's hole stays at the mean colour (0).
    """
    b = x.shape[0]
    # Both drawn in one call (one generator advance), as (B,2) -> two (B,1,1,1) columns.
    u = torch.rand(b, 2, generator=g, device=x.device, dtype=torch.float32) * 2 - 1
    shift = (u[:, 0] * brightness).to(x.dtype).view(b, 1, 1, 1)
    scale = (1 + u[:, 1] * contrast).to(x.dtype).view(b, 1, 1, 1)
    if inplace:
        return x.add_(shift).mul_(scale)
    return (x + shift) * scale


def _cutout(x: torch.Tensor, size: int, g: torch.Generator, *, inplace: bool) -> torch.Tensor:
    """Zero a size x size square per sample, centred uniformly anywhere in the image (clipped at borders)."""
    b, _, h, w = x.shape
    dev = x.device
    centre = torch.randint(0, h * w, (b, 1), generator=g, device=dev)
    cy, cx = centre // w, centre % w
    # Square covers [c - size//2, c - size//2 + size): for size 16 that is c-8 .. c+7.
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=dev).view(1, h)
    cols = torch.arange(w, device=dev).view(1, w)
    in_rows = (rows >= top) & (rows < top + size)  # (B,H)
    in_cols = (cols >= left) & (cols < left + size)  # (B,W)
    hole = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)  # (B,1,H,W)
    return x.masked_fill_(hole, 0.0) if inplace else x.masked_fill(hole, 0.0)
