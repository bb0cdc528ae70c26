"""Pictures of explanations: de-normalised images, jet CAM overlays, captioned galleries.

Galleries are composed as ONE pixel mosaic (numpy) drawn with a single ``imshow`` plus
text, instead of one matplotlib Axes per panel: a 20-image gallery has 60 panels, and
60 Axes take seconds to lay out and draw, the mosaic a few tens of milliseconds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SCALE = 3  # 32x32 images are shown at 96x96 (nearest neighbour: the real pixels)
ALPHA = 0.5  # weight of the heat map in an overlay
_GAP = 4  # pixels between panels of one tile
_TILE_GAP = 12  # pixels between tiles
_CAPTION = 30  # pixel rows above each tile for its two-line caption
_HEADER = 18  # pixel rows for the panel titles at the top of a gallery
_DPI = 100


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, 3, H, W) model inputs -> uint8 (B, H, W, 3) images, using the checkpoint's stats."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (x.detach().float().cpu() * s + m) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def heatmap(cam: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) float RGB in the jet colour map."""
    from matplotlib import colormaps

    return colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3]


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """uint8 (H, W, 3) image blended with the jet heat map of ``cam`` -> uint8 (H, W, 3)."""
    blend = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * heatmap(np.asarray(cam, dtype=np.float32))
    return (np.clip(blend, 0, 1) * 255).round().astype(np.uint8)


def _upscale(img: np.ndarray, scale: int = SCALE) -> np.ndarray:
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


@dataclass(frozen=True)
class GalleryItem:
    """One row of a gallery: the image, its panels and its two caption lines."""

    panels: list[np.ndarray]  # uint8 (H, W, 3) each, same size
    caption: tuple[str, str]


def gallery_figure(
    items: Sequence[GalleryItem],
    panel_titles: Sequence[str],
    title: str,
    per_row: int = 5,
    accent: str = "#b00",
    min_cols: int = 1,
):
    """Matplotlib Figure of captioned tiles, ``per_row`` tiles per row, pixel-exact.

    The second caption line (the prediction) is drawn in ``accent``. The figure is at
    least ``min_cols`` tiles wide even with fewer items, so that strips of different
    lengths share one scale and a one-image strip still has room for its title.
    """
    from matplotlib.figure import Figure

    if not items:
        fig = Figure(figsize=(4, 0.6), dpi=_DPI)
        fig.text(0.5, 0.5, f"{title}: no images", ha="center", va="center")
        return fig
    k = len(items[0].panels)
    ph, pw = items[0].panels[0].shape[0] * SCALE, items[0].panels[0].shape[1] * SCALE
    tile_w = k * pw + (k - 1) * _GAP
    tile_h = _CAPTION + ph
    cols = min(per_row, max(len(items), min_cols))
    rows = -(-len(items) // cols)
    width = cols * tile_w + (cols + 1) * _TILE_GAP
    height = 24 + _HEADER + rows * tile_h + (rows + 1) * _TILE_GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    top = 24 + _HEADER
    for i, item in enumerate(items):
        r, c = divmod(i, cols)
        x0 = _TILE_GAP + c * (tile_w + _TILE_GAP)
        y0 = top + _TILE_GAP + r * (tile_h + _TILE_GAP)
        for j, panel in enumerate(item.panels):
            px = x0 + j * (pw + _GAP)
            canvas[y0 + _CAPTION : y0 + _CAPTION + ph, px : px + pw] = _upscale(panel)
        ax.text(x0, y0 + 2, item.caption[0], fontsize=7.5, va="top", ha="left", color="#111")
        ax.text(x0, y0 + 15, item.caption[1], fontsize=7.5, va="top", ha="left", color=accent)
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.text(_TILE_GAP, 6, title, fontsize=10, fontweight="bold", va="top", ha="left")
    for c in range(cols):
        for j, name in enumerate(panel_titles):
            px = _TILE_GAP + c * (tile_w + _TILE_GAP) + j * (pw + _GAP) + pw / 2
            ax.text(px, 24 + 2, name, fontsize=7, va="top", ha="center", color="#555")
    return fig


def figure_png(fig) -> bytes:
    """Render a Figure to PNG bytes with the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" tEXt chunk: it carries matplotlib's URL, and reports promise none.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def save_png(fig, path: str | Path) -> Path:
    """Write a Figure as PNG; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig))
    return path


def prediction_figure(image: np.ndarray, cam: np.ndarray, lines: Sequence[str], title: str, method: str = "Grad-CAM"):
    """Input image (as the model sees it, 32x32) beside its CAM overlay (titled with ``method``),
    with the top-k lines below."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.9), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("input (32x32)", fontsize=8)
    axes[1].imshow(overlay(image, cam), interpolation="nearest")
    axes[1].set_title(f"{method}: {lines[0].split(' ')[0] if lines else ''}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("\n".join(lines), fontsize=8)
    return fig
