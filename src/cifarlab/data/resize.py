"""Progressive resizing: train the first part of a run on downscaled images.

A conv net's cost per image scales with its pixel count, so an epoch at 24x24 costs about
half of one at 32x32 (docs/performance.md has the measured rate). The early epochs,
where the net learns coarse features at a high learning rate, lose little from the lower
resolution; the last epochs at full size adapt the filters and BatchNorm statistics to the
size they are evaluated at (fastai's progressive resizing; Touvron et al. 2019 on the
train/test resolution gap). Evaluation is always at full size.

The schedule is written ``"SIZE:FRACTION[,SIZE:FRACTION...]"``: ``"24:0.5"`` trains the
first half of the epochs at 24 px, ``"20:0.25,24:0.25"`` a quarter at 20 px, then a
quarter at 24 px, the rest at full size. Fractions (not epoch counts) so the schedule
keeps its shape when ``--epochs`` changes; stage ``i`` ends after
``floor(sum of fractions up to i * epochs)`` epochs, and fractions sum to less than 1, so
every run ends with at least one full-size epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CifarlabError

#: Smallest trainable side. The fast net's 2x2 stem and three 2x pools need >= 9 px for a
#: non-empty final map; below 16 px a CIFAR object is a few blobs, not worth training on.
MIN_SIZE = 16

_USAGE = 'use e.g. "24:0.5" (first half of the epochs at 24 px), "20:0.25,24:0.25" or "none"'


@dataclass(frozen=True)
class ResizeSchedule:
    """Stages ``((size, fraction), ...)`` of downscaled training; empty = always full size."""

    stages: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for size, fraction in self.stages:
            if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
                raise CifarlabError(f"progressive_resize size must be an integer >= {MIN_SIZE}, got {size!r}; {_USAGE}")
            if not 0.0 < fraction < 1.0:
                raise CifarlabError(f"progressive_resize fraction must be in (0, 1), got {fraction!r}; {_USAGE}")
        if sum(f for _, f in self.stages) >= 1.0 - 1e-9:
            raise CifarlabError(
                f"progressive_resize fractions must sum to less than 1 (the run has to end at full size); "
                f"got {str(self)!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether any epoch trains below full size."""
        return bool(self.stages)

    def __str__(self) -> str:
        """Canonical text form; ``ResizeSchedule.parse(str(s)) == s``."""
        return ",".join(f"{size}:{fraction:g}" for size, fraction in self.stages) or "none"

    @classmethod
    def parse(cls, text: str) -> "ResizeSchedule":
        """Parse ``"24:0.5"``, ``"20:0.25,24:0.25"`` or ``"none"``; bad text raises CifarlabError."""
        raw = str(text).strip().lower()
        if raw in ("", "none"):
            return cls()
        stages = []
        for token in raw.split(","):
            size, sep, fraction = token.strip().partition(":")
            try:
                if not sep:
                    raise ValueError
                stages.append((int(size), float(fraction)))
            except ValueError:
                raise CifarlabError(f"bad progressive_resize stage {token.strip()!r} in {text!r}; {_USAGE}") from None
        return cls(tuple(stages))

    def epoch_sizes(self, epochs: int) -> tuple[int | None, ...]:
        """Training size of each of ``epochs`` epochs (None = full size)."""
        sizes: list[int | None] = []
        done = 0.0
        for size, fraction in self.stages:
            done += fraction
            end = math.floor(done * epochs + 1e-9)  # 1e-9: 0.3 + 0.2 is 0.49999... in binary
            sizes.extend([size] * (end - len(sizes)))
        return tuple(sizes) + (None,) * (epochs - len(sizes))

    def check_images(self, height: int, width: int) -> None:
        """Every stage must shrink the ``height x width`` training images."""
        for size, _ in self.stages:
            if size >= min(height, width):
                raise CifarlabError(
                    f"progressive_resize size {size} must be smaller than the {height}x{width} training images"
                )

    def describe(self, epochs: int) -> str:
        """``"epochs 1-4 at 24 px"``-style summary for the log; "" when nothing is resized."""
        parts = []
        sizes = self.epoch_sizes(epochs)
        for size, _ in self.stages:
            hits = [e + 1 for e, s in enumerate(sizes) if s == size]
            if hits:
                span = f"epoch {hits[0]}" if len(hits) == 1 else f"epochs {hits[0]}-{hits[-1]}"
                parts.append(f"{span} at {size} px")
        return ", ".join(parts)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Downscale a (B,C,H,W) float batch so its shorter side is ``size`` (aspect kept).

    Bilinear with antialiasing: plain bilinear at a 0.75 scale skips pixels and aliases
    fine texture, which the net would then learn and never see at full size.
    """
    h, w = x.shape[-2:]
    out = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
    return F.interpolate(x, size=out, mode="bilinear", antialias=True, align_corners=False)
