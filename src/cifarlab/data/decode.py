"""Image decoding for image folders: any file Pillow reads -> uint8 RGB 32x32.

JPEGs go through torchvision's libjpeg-turbo op when it is available (same pixels as
Pillow, about twice as fast), everything else and every unusual JPEG through Pillow.
Large file lists are decoded by a process pool. Decoding never raises for a bad file:
:func:`decode_images` returns the failures so that one pass can report all of them.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .dataset import IMAGE_SIZE

# Bump whenever image decoding/resizing changes (decoded imagefolder caches depend on it).
# 2: 16-bit grayscale PNGs are scaled to 8 bits instead of clipped to white.
DECODER_VERSION = 2

# Below this many files a process pool costs more (fork + result transfer) than it saves.
_POOL_MIN_FILES = 2048


def _read_bytes(path: str) -> bytes:
    # os.open/os.read costs about half of open().read() per file (no buffered-IO object).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        parts = []
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            parts.append(block)
    finally:
        os.close(fd)
    return b"".join(parts)


def _resize(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    # Pillow's BILINEAR widens its kernel when shrinking, i.e. it antialiases.
    im = Image.fromarray(rgb, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(im)


def _jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's libjpeg-turbo op, or None where it is unavailable.

    It decodes a tiny JPEG ~2x faster than Pillow with pixel-identical output (both
    are libjpeg-turbo with default settings: islow IDCT, fancy upsampling). The raw op
    is called rather than ``torchvision.io.decode_jpeg``, whose wrapper issues a
    DeprecationWarning per call since torchvision 0.29 and costs ~20 us of Python per
    image. If a future torchvision drops the op, decoding silently falls back to
    Pillow: same pixels, just slower.
    """
    op = _registered_jpeg_op()
    if op is None:
        _load_image_ops()
        op = _registered_jpeg_op()
    if op is None:
        return None
    # Mode 0 = ImageReadMode.UNCHANGED: keep 1 or 3 channels, let us handle the rest.
    return lambda data: op(data, 0, False)


def _registered_jpeg_op() -> Callable[..., torch.Tensor] | None:
    try:
        return torch.ops.image.decode_jpeg
    except Exception:  # noqa: BLE001 - not registered (yet)
        return None


def _load_image_ops() -> None:
    """Register torchvision's image ops, loading just their library when possible.

    ``import torchvision`` costs ~1.5 s (it pulls in models, ops and datasets), a third
    of a cold CIFAR-sized load; loading ``image_stable`` the way torchvision itself
    does (same file, same ``torch.ops.load_library``) takes milliseconds and a later
    ``import torchvision`` reuses it. Windows needs torchvision's DLL-path setup, and
    any surprise just means the full import.
    """
    if os.name == "posix":
        try:
            from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, FileFinder
            from importlib.util import find_spec

            spec = find_spec("torchvision")
            if spec is not None and spec.submodule_search_locations:
                finder = FileFinder(list(spec.submodule_search_locations)[0], (ExtensionFileLoader, EXTENSION_SUFFIXES))
                for name in ("image_stable", "image"):  # torchvision >= 0.27 and older names
                    lib = finder.find_spec(name)
                    if lib is not None and lib.origin:
                        torch.ops.load_library(lib.origin)
                        return
        except Exception:  # noqa: BLE001 - fall through to the regular import
            pass
    try:
        import torchvision.io.image  # noqa: F401 - registers torch.ops.image.*
    except Exception:  # noqa: BLE001 - no torchvision image ops: Pillow only
        pass


def _decode_jpeg_fast(decoder: Callable[[torch.Tensor], torch.Tensor], data: bytes) -> np.ndarray | None:
    """Decode with the fast op; None (caller falls back to Pillow, which decides what is
    "unreadable") for anything unusual: CMYK/YCCK JPEGs, decoder errors or warnings."""
    try:
        out = decoder(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except Exception:  # noqa: BLE001 - Pillow gets the final word
        return None
    if out.dim() != 3:
        return None
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1)  # grayscale -> RGB replicates, exactly like Pillow's convert("RGB")
    elif out.shape[0] != 3:
        return None
    return out.permute(1, 2, 0).numpy()


def _decode_image(path: str, decoder: Callable[[torch.Tensor], torch.Tensor] | None) -> np.ndarray:
    """Decode one file to a (32,32,3) uint8 RGB array; raises on anything Pillow cannot read."""
    data = _read_bytes(path)
    rgb = None
    if decoder is not None and data[:3] == b"\xff\xd8\xff":  # JPEG start-of-image marker
        rgb = _decode_jpeg_fast(decoder, data)
    if rgb is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return image_pixels(im)
    return _fit(rgb)


def image_pixels(im: Any) -> np.ndarray:
    """A Pillow image (any mode, any size) as the (32,32,3) uint8 RGB array that
    :func:`decode_images` makes of a file holding it; raises on unreadable image data.

    For callers that already hold an image in memory (the demo app's uploads), so that it
    predicts exactly as the same file does in ``cifarlab predict``.
    """
    return _fit(_to_rgb(im))


def _fit(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB at the model's input size (antialiased resize when it differs)."""
    if rgb.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = _resize(np.ascontiguousarray(rgb))
    return rgb


def _to_rgb(im: Any) -> np.ndarray:
    """A Pillow image of any mode as (H, W, 3) uint8 RGB.

    ``convert("RGB")`` handles 8-bit modes (L, LA, P, RGBA: alpha dropped, CMYK, YCbCr)
    but *clips* 16/32-bit grayscale (PNG ``I;16``, ``I``) at 255, turning a 16-bit scan
    nearly white; those are scaled down to their top 8 bits instead. 16-bit RGB(A) PNGs
    already open as 8-bit RGB(A).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
            gray = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            gray = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        else:
            gray = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _decode_chunk(paths: Sequence[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode ``paths`` into one (n,32,32,3) array; failures are collected, not raised.

    Collecting lets a single pass report *every* bad file at once. Runs in pool workers,
    so it must stay a picklable module-level function.
    """
    decoder = _jpeg_decoder()
    out = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    bad: list[tuple[str, str]] = []
    for i, path in enumerate(paths):
        try:
            out[i] = _decode_image(path, decoder)
        except Exception as exc:  # noqa: BLE001 - every failure means "unreadable image"
            bad.append((path, " ".join(str(exc).split())[:120] or type(exc).__name__))
    return out, bad


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork (Linux) starts workers in milliseconds without re-importing torch (~2 s per
    # worker with spawn); it is safe here for the same reason it is for torch's own
    # DataLoader workers: the children only touch CPU tensors, Pillow and numpy.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def decode_images(paths: Sequence[str], *, progress: bool = False, desc: str = "decoding") -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Decode image files to a uint8 (N,3,32,32) tensor, using one process per CPU for large sets.

    Returns the images and the list of ``(path, reason)`` that failed to decode (their
    slots are zero). Files go to workers in contiguous chunks (several per worker, for
    load balance and a smooth progress bar); the parent only concatenates.
    """
    n = len(paths)
    workers = os.cpu_count() or 1
    # Register the decoder here, before forking, so that workers inherit it instead of
    # each loading it on its first chunk.
    _jpeg_decoder()
    bar = _progress_bar(n, desc) if progress else None
    if n < _POOL_MIN_FILES or workers < 2:
        chunks = [list(paths[i : i + 1024]) for i in range(0, n, 1024)]
        results = []
        for chunk in chunks:
            results.append(_decode_chunk(chunk))
            if bar is not None:
                bar.update(len(chunk))
    else:
        size = max(256, min(2048, math.ceil(n / (workers * 8))))
        chunks = [list(paths[i : i + size]) for i in range(0, n, size)]
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_pool_context()) as pool:
            futures = [pool.submit(_decode_chunk, chunk) for chunk in chunks]
            results = []
            for fut, chunk in zip(futures, chunks):
                results.append(fut.result())
                if bar is not None:
                    bar.update(len(chunk))
    if bar is not None:
        bar.close()
    bad = [b for _, chunk_bad in results for b in chunk_bad]
    if results:
        hwc = np.concatenate([arr for arr, _ in results])
    else:
        hwc = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    return images, bad


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)
