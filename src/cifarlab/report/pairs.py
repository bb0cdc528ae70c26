"""The test images behind each most-confused pair: one strip per pair, most confident first.

The report's pair table links every (actual, predicted) row to its strip: an in-page
anchor in ``report.html`` (the strip embedded below the table) and a link to
``report_files/<name>.png`` in ``README.md``. The strips are read off the stored test
logits, so they cost no model call.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from cifarlab.report.render import Figure_

#: Test images shown per pair.
PAIR_IMAGES = 8


def pair_name(actual_id: int, predicted_id: int, actual: str, predicted: str) -> str:
    """``confused-<a>-<p>-<actual>-<predicted>``: HTML id and PNG name of a pair's strip.

    The class ids keep names unique whatever the class names hold; the names, reduced
    to ``[A-Za-z0-9_-]``, keep the file recognisable.
    """
    slug = "-".join(re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "class" for name in (actual, predicted))
    return f"confused-{actual_id}-{predicted_id}-{slug}"


def pair_figures(
    pairs: Sequence[Mapping[str, Any]], logits: torch.Tensor, targets: torch.Tensor, test_images: torch.Tensor
) -> list[Figure_]:
    """One strip of up to ``PAIR_IMAGES`` test images per pair row (``actual_id``,
    ``predicted_id``, ``actual``, ``predicted``, ``count``, ``figure``), captioned with the
    test index and the probability of the predicted class."""
    from cifarlab.explain.overlay import GalleryItem, figure_png, gallery_figure
    from cifarlab.explain.select import select_confused

    out = []
    for p in pairs:
        sel = select_confused(logits, targets, p["actual_id"], p["predicted_id"], PAIR_IMAGES)
        pictures = test_images[sel.indices].permute(0, 2, 3, 1).contiguous().numpy()
        items = [
            GalleryItem([pictures[i]], (f"#{int(sel.indices[i])}", f"p={float(sel.probs[i]):.2f}"))
            for i in range(len(sel))
        ]
        title = f"{p['actual']} predicted as {p['predicted']}: {len(sel)} of {p['count']}"
        fig = gallery_figure(items, [], title, per_row=PAIR_IMAGES, accent="#b00", min_cols=PAIR_IMAGES)
        alt = f"test images of class {p['actual']} predicted as {p['predicted']}, most confident first"
        out.append(Figure_(p["figure"], alt, figure_png(fig)))
    return out
