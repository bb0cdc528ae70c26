"""The demo app's callbacks: what each Gradio event does with a DemoModel.

Kept apart from the layout (``app.py``) so they can be unit-tested without a server.
Every user-facing failure (a CifarlabError from the model: unreadable or oversized
upload, unknown layer or class) becomes a ``gr.Error``, which Gradio shows as a message
in the page instead of a traceback.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cifarlab.errors import CifarlabError

if TYPE_CHECKING:
    import numpy as np

    from cifarlab.demo.core import DemoModel

ANY = "any"  # the "no filter" choice of the misclassified tab's class dropdowns
NO_CLASS = "none"  # the "no second CAM" choice of the classify tab's class dropdown
DEFAULT_CAM = "gradcam"  # the CAM method when none is chosen (config.CAM_METHODS[0])
FIGURES = {"curves": "Training curves", "per_class": "Per-class accuracy", "confusion": "Confusion matrix"}


def gradio() -> Any:
    """Import gradio with its telemetry off; a one-line error when the extra is missing.

    Gradio reads GRADIO_ANALYTICS_ENABLED when it is imported, so it is set here, in the
    one place that imports it, rather than by whoever happens to import gradio first.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise CifarlabError("cifarlab demo needs gradio: pip install 'cifarlab[demo]'") from None
    return gr


def upload_path(value: Any) -> Any:
    """The image a Gradio upload refers to: the cached file's path for a file payload.

    The predict events skip Gradio's own preprocessing, so the model decodes the very
    file that was uploaded, as ``cifarlab predict`` decodes files (no EXIF rotation,
    no colour conversion by Gradio first), and an unreadable file reaches the model's
    one-line error instead of failing inside Gradio. PIL images, arrays and paths pass
    through unchanged.
    """
    if isinstance(value, dict):
        path = value.get("path")
        if not path:
            raise CifarlabError("the upload has no file; upload the image again")
        return path
    return value


class ImageFiles:
    """Hands images to Gradio as PNG files written once, named by their content.

    Given an array, Gradio writes it into its cache under a content-hash name every time it
    is returned, even when that file exists and a browser is downloading it: the download
    then sees the file change under it ("Too much data for declared Content-Length") and
    the image never loads (seen when a gallery shows an image again). A file path Gradio
    copies into its cache only once, so each distinct image is written here once, under a
    temporary name and renamed into place.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cifarlab-demo-"))
        atexit.register(shutil.rmtree, self.dir, True)

    def __call__(self, image: "np.ndarray | None") -> str | None:
        """The path of a PNG holding ``image`` (uint8 (H, W, 3)); None stays None."""
        if image is None:
            return None
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        data = buf.getvalue()
        path = self.dir / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{id(data)}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)


class Handlers:
    """The app's callbacks over one model (DemoModel is thread-safe: Gradio's workers share it)."""

    def __init__(self, model: "DemoModel", files: ImageFiles | None = None):
        self.model = model
        self.files = files if files is not None else ImageFiles()

    def _call(self, fn: Callable[[], Any]) -> Any:
        gr = gradio()
        try:
            return fn()
        except CifarlabError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def predict(
        self, image: Any, top_k: float, show_cam: bool, layer: str | None, opacity: float, cam: str | None = DEFAULT_CAM,
    ) -> tuple[Any, Any]:
        """API ``predict``: ({class: probability} of the top_k classes, CAM overlay or None).
        ``cam`` (the CAM method) comes last and defaults to Grad-CAM, so five-argument calls keep working."""
        if image is None:  # cleared upload: clear the outputs too
            return None, None
        scores, overlay, _ = self._call(lambda: self.model.predict(
            upload_path(image), top_k=int(top_k), show_cam=bool(show_cam), layer=layer or None, opacity=float(opacity),
            cam=cam or DEFAULT_CAM,
        ))
        return scores, self.files(overlay) if show_cam else None

    def class_cam(
        self, image: Any, cam_class: str | None, show_cam: bool, layer: str | None, opacity: float,
        cam: str | None = DEFAULT_CAM,
    ) -> Any:
        """The CAM overlay for a class the user picked (None when none is picked or CAM is off)."""
        if image is None or not show_cam or cam_class in (None, "", NO_CLASS):
            return None
        _, _, overlay = self._call(lambda: self.model.predict(
            upload_path(image), top_k=1, show_cam=True, layer=layer or None, opacity=float(opacity), cam_class=cam_class,
            cam=cam or DEFAULT_CAM,
        ))
        return self.files(overlay)

    def misclassified(
        self, count: float, show_cam: bool, actual: str | None, predicted: str | None, cam: str | None = DEFAULT_CAM,
    ) -> list[tuple[str, str]]:
        """API ``misclassified``: [(PNG path, "actual / predicted (p)")], most confident mistakes first
        (``cam``, last and optional: the CAM method)."""
        gr = gradio()
        items = self._call(lambda: self.model.misclassified(
            count=int(count), show_cam=bool(show_cam), actual=None if actual in (None, "", ANY) else actual,
            predicted=None if predicted in (None, "", ANY) else predicted, cam=cam or DEFAULT_CAM,
        ))
        if not items:
            filtered = actual not in (None, "", ANY) or predicted not in (None, "", ANY)
            gr.Info("No misclassified test images match this filter." if filtered
                    else "No misclassified test images: the model got every one right.")
        return [(self.files(image), caption) for image, caption in items]

    def figures(self) -> dict[str, Any]:
        """The run's figures as PIL images, keyed like FIGURES (absent ones left out)."""
        from PIL import Image

        out = {}
        for key, png in self.model.figures().items():
            if key in FIGURES and png:
                with Image.open(io.BytesIO(png)) as im:
                    out[key] = im.convert("RGB")
        return out


def _percent(value: Any) -> str:
    return f"{float(value):.2%}"


def _duration(seconds: Any) -> str:
    s = int(round(float(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _params(value: Any) -> str:
    n = int(value)
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


# (info key, row label, formatter) of the Run tab's table, in display order.
_INFO_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("run", "Run", str),
    ("model", "Model", str),
    ("params", "Parameters", _params),
    ("preset", "Preset", str),
    ("accuracy", "Accuracy of this model", _percent),
    ("best_acc", "Best accuracy", _percent),
    ("best_epoch", "Best epoch", str),
    ("last_acc", "Last accuracy", _percent),
    ("epochs", "Epochs", str),
    ("wall_seconds", "Training time", _duration),
    ("eval_split", "Evaluated on (split)", str),
    ("n_eval", "Evaluation images", str),
    ("data", "Data", str),
    ("tta", "Test-time augmentation", str),
    ("precision", "Precision", str),
    ("device", "Device", str),
]


def info_markdown(info: dict[str, Any]) -> str:
    """The run's headline numbers as a two-column Markdown table (missing keys left out)."""
    rows = ["| Run summary | |", "|---|---|"]
    for key, label, fmt in _INFO_ROWS:
        value = info.get(key)
        if value is None or value == "":
            continue
        try:
            text = fmt(value)
        except (TypeError, ValueError):
            text = str(value)
        rows.append(f"| {label} | {text.replace('|', '/')} |")
    return "\n".join(rows)


def headline(info: dict[str, Any]) -> str:
    """One line under the title: model, accuracy, and a warning for synthetic data."""
    parts = [f"**{info.get('model', 'model')}**"]
    acc = next((info[k] for k in ("accuracy", "last_acc", "best_acc") if info.get(k) is not None), None)
    if acc is not None:
        parts.append(f"accuracy {_percent(acc)} on the {info.get('eval_split') or 'test'} split")
    if info.get("data"):
        parts.append(str(info["data"]))
    line = " · ".join(parts)
    if "synthetic" in str(info.get("data", "")).lower():
        line += "\n\n**Trained on SYNTHETIC data:** its classes are not CIFAR-10's; real photos get arbitrary answers."
    return line


def confusion_table(classes: list[str], confusion: list[list[int]]) -> list[list[Any]]:
    """Rows for the Run tab's clickable confusion table: the actual class, then the counts."""
    return [[name, *map(int, row)] for name, row in zip(classes, confusion)]


def confusion_cell(classes: list[str], index: Any) -> tuple[str, str] | None:
    """(actual, predicted) of a clicked confusion-table cell; None for the class column or
    the diagonal (correct predictions: nothing misclassified to show)."""
    try:
        row, col = (int(i) for i in index)
    except (TypeError, ValueError):
        return None
    if not (0 <= row < len(classes) and 1 <= col <= len(classes)) or row == col - 1:
        return None
    return classes[row], classes[col - 1]
