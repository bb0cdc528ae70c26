"""Images in and out of the demo: uploads -> the model's 32x32 pixels, and CAM overlays for display.

An upload is converted by the code that decodes image folders and ``cifarlab predict``'s
files (:mod:`cifarlab.data.decode`), so the app's top-1 agrees with ``cifarlab predict`` on
the same file. Overlays are drawn at :data:`DISPLAY_SIZE`: the 32x32 image upscaled with
nearest neighbour (its real pixels) under a heat map upsampled bilinearly from the
layer's own map, which looks smooth instead of blocky.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.errors import CifarlabError

DISPLAY_SIZE = 224  # pixels per side of an image shown in the app (7 x 32)


def to_pixels(image: Any, max_bytes: int) -> np.ndarray:
    """An image as the model's input pixels: uint8 (32, 32, 3) RGB.

    ``image`` is a file path (decoded as ``cifarlab predict`` decodes files; refused when
    larger than ``max_bytes``), a Pillow image, or a uint8 array (H, W), (H, W, 1|3|4).
    Anything unreadable is a one-line :class:`CifarlabError`.
    """
    if image is None:
        raise CifarlabError("no image given: upload an image first")
    if isinstance(image, (str, os.PathLike)):
        return _file_pixels(Path(image), max_bytes)
    if isinstance(image, np.ndarray):
        return _pil_pixels(_array_image(image))
    from PIL import Image

    if isinstance(image, Image.Image):
        return _pil_pixels(image)
    raise CifarlabError(f"expected an image (a Pillow image, a uint8 array or a file path), got {type(image).__name__}")


def _file_pixels(path: Path, max_bytes: int) -> np.ndarray:
    from cifarlab.data.decode import decode_images

    if not path.is_file():
        raise CifarlabError(f"image not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise CifarlabError(f"{path.name} is {size / 2**20:.1f} MB; images up to {max_bytes / 2**20:.0f} MB are accepted")
    images, bad = decode_images([str(path)])
    if bad:
        # Pillow names the in-memory buffer it read from ("<_io.BytesIO object at 0x...>"): noise to a user.
        why = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", bad[0][1]).strip() or "unreadable"
        raise CifarlabError(f"{path.name} could not be read as an image ({why})")
    return images[0].permute(1, 2, 0).numpy()


def _pil_pixels(im: Any) -> np.ndarray:
    from cifarlab.data.decode import image_pixels

    try:
        return image_pixels(im)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data; all mean "unreadable"
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise CifarlabError(f"the image could not be read ({reason})") from None


def _array_image(arr: np.ndarray):
    """A uint8 (H, W) / (H, W, 1|3|4) array as a Pillow image of mode L / RGB / RGBA."""
    from PIL import Image

    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise CifarlabError(f"an image array must be uint8 (H, W) or (H, W, 1|3|4), got {arr.dtype} {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(arr))


def upscale(pixels: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """uint8 (..., H, W, 3) -> (..., size, size, 3) with nearest neighbour: the real pixels, enlarged."""
    h, w = pixels.shape[-3:-1]
    if size % h == 0 and size % w == 0:
        return pixels.repeat(size // h, axis=-3).repeat(size // w, axis=-2)
    from PIL import Image

    flat = pixels.reshape(-1, h, w, 3)
    big = [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.NEAREST)) for p in flat]
    return np.stack(big).reshape(*pixels.shape[:-3], size, size, 3)


def cam_overlays(pixels: np.ndarray, maps: torch.Tensor, opacity: float, size: int = DISPLAY_SIZE) -> np.ndarray:
    """uint8 (B, size, size, 3): each raw CAM map of (B, h, w) as a jet heat map over its image.

    ``pixels`` is one uint8 (H, W, 3) image for all maps or (B, H, W, 3), one per map;
    ``opacity`` is the heat map's weight (0: the image only, 1: the heat map only). The
    colours and the blend are those of :func:`cifarlab.explain.overlay.overlay` (the
    report's overlays), computed through a colour table in float32: a 50-image gallery
    has 100 overlays of 224x224 pixels, and this is several times faster.
    """
    from cifarlab.explain.cams import upsample_and_normalise

    cams = upsample_and_normalise(maps.float(), (size, size)).numpy()
    big = upscale(pixels, size).astype(np.float32) / 255.0
    index = np.minimum((cams * _TABLE_SIZE).astype(np.int32), _TABLE_SIZE - 1)
    blend = (1.0 - opacity) * big + opacity * _jet_table()[index]
    return (np.clip(blend, 0.0, 1.0) * 255.0).round().astype(np.uint8)


_TABLE_SIZE = 256  # matplotlib's colour maps are tables of 256 colours


@functools.lru_cache(maxsize=1)
def _jet_table() -> np.ndarray:
    """``heatmap``'s 256 colours, float32 (256, 3): entry i is the colour of every value in
    [i/256, (i+1)/256), exactly as the colour map itself looks values up."""
    from cifarlab.explain.overlay import heatmap

    return heatmap((np.arange(_TABLE_SIZE) + 0.5) / _TABLE_SIZE).astype(np.float32)
