"""Everything the demo app computes, without gradio: :class:`DemoModel`.

``DemoModel.load(source)`` opens a run directory, a checkpoint or an exported folder
(see :mod:`cifarlab.demo.sources`) once; afterwards each call is one prediction with the
run's TTA (``engine.run_epoch``, as ``cifarlab predict`` does, so top-1 agrees) plus, for
a CAM, one call of the chosen CAM method (Grad-CAM by default; see
:mod:`cifarlab.explain.cams`). Calls may come from several threads at once (the web
server's workers): the model is used under a lock, because a CAM hooks the layer and
switches the model to eval mode for the duration of a call.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.demo.images import cam_overlays, to_pixels, upscale
from cifarlab.demo.layers import cam_layers
from cifarlab.demo.pool import Pool, build_pool, examples_of
from cifarlab.demo.runinfo import headline, run_figures
from cifarlab.demo.sources import Source, open_source
from cifarlab.demo.store import DEMO_DATA_FILE, DemoData, write_demo_data
from cifarlab.errors import CifarlabError
from cifarlab.runtime import Runtime

__all__ = ["DEMO_DATA_FILE", "MAX_MISCLASSIFIED", "MAX_TOP_K", "MAX_UPLOAD_BYTES", "DemoModel"]

MAX_UPLOAD_BYTES = 10 * 2**20  # uploads larger than this get an in-app message
MAX_MISCLASSIFIED = 50  # most misclassified images shown at once (the pool keeps this many per class pair)
MAX_TOP_K = 10  # most classes a prediction lists
_NO_FILTER = (None, "", "any")
_MAP_CACHE_MAX = 4096  # cached raw CAM maps of pool images (a few kB each)


class DemoModel:
    """A trained model with what the app shows about it; build it with :meth:`load`.

    Attributes: ``classes``; ``layers`` (CAM layers offered, default first, names as
    in ``named_modules()``); ``default_layer``; ``runtime``; ``info`` (headline numbers, see
    :func:`cifarlab.demo.runinfo.headline`); ``metrics`` (``accuracy``, ``per_class``,
    ``confusion``, ``n`` on the evaluation split); ``examples`` (one (32, 32, 3) uint8 test
    image per class, up to 10, with its class name); ``config`` (the run's stored config);
    ``model``; ``source`` and ``weights_path`` (what was loaded).
    """

    def __init__(self, src: Source, data: DemoData, history: list[dict[str, Any]], lrs: list[float], source: Path):
        self.model: nn.Module = src.model
        self.runtime: Runtime = src.runtime
        self._cfg = src.cfg
        self._mean, self._std = tuple(src.ckpt["mean"]), tuple(src.ckpt["std"])
        self.config: dict[str, Any] = dict(src.ckpt.get("config", {}))
        self.classes: list[str] = list(data.classes)
        self.layers: list[str] = list(data.layers)
        self.default_layer: str = self.layers[0]
        self.info: dict[str, Any] = data.info
        self.metrics: dict[str, Any] = data.metrics
        self.examples: list[tuple[np.ndarray, str]] = data.examples
        self.source = source
        self.weights_path: Path = src.weights_path
        self._pool: Pool = data.pool
        self._history, self._lrs = history, lrs
        self._figures: dict[str, bytes] | None = data.figures or None
        self._lock = threading.Lock()  # the model (predictions, CAMs) and the map cache
        self._figure_lock = threading.Lock()
        self._maps: dict[tuple[str, str, int], torch.Tensor] = {}  # (layer, method, pool index)

    @classmethod
    def load(cls, source: str | Path, *, device: str | None = None, data: str | None = None) -> "DemoModel":
        """Open ``source``: a run directory (``checkpoints/last.pt``; ``predictions.npz`` when it
        matches; test data from the run's config or ``data``), a checkpoint file (.pt or
        .safetensors; test data likewise), or an exported folder (``model.safetensors`` +
        ``demo_data.npz``: no dataset needed). Runs on ``device`` (default: the CPU).
        CifarlabError with a one-line message for a missing checkpoint, an unreadable file
        or missing data."""
        from cifarlab.evaluate import metrics_from_logits

        src = open_source(source, device=device, data=data)
        layers = cam_layers(src.model)
        if src.stored is not None:
            stored = src.stored
            # The numbers describe the run; where it runs now is this process's business.
            info = {**stored.info, "precision": src.runtime.precision, "device": str(src.runtime.device)}
            demo_data = DemoData(stored.classes, stored.pool, stored.examples, info, stored.metrics, layers, stored.figures)
        else:
            classes = list(src.ckpt["classes"])
            metrics = {**metrics_from_logits(src.logits, src.targets, classes), "n": int(src.targets.numel())}
            test = src.dataset.test
            name = (src.run_dir or src.weights_path).name
            demo_data = DemoData(
                classes=classes,
                pool=build_pool(src.logits, src.targets, test.images, MAX_MISCLASSIFIED),
                examples=examples_of(test.images, test.labels, classes),
                info=headline(src.ckpt, src.history, src.model, src.runtime, src.dataset, metrics, name),
                metrics=metrics,
                layers=layers,
                figures={},
            )
        demo = cls(src, demo_data, src.history, src.lrs, Path(source))
        # One call now pays the first-call costs (pytorch-grad-cam import, kernel set-up), not the first user.
        demo.predict(np.zeros((32, 32, 3), np.uint8), top_k=1, show_cam=True)
        return demo

    # ----------------------------------------------------------------------- classify

    def predict(
        self,
        image: Any,
        top_k: int = 3,
        show_cam: bool = True,
        layer: str | None = None,
        opacity: float = 0.5,
        cam_class: str | None = None,
        cam: str = "gradcam",
    ) -> tuple[dict[str, float], np.ndarray | None, np.ndarray | None]:
        """Classify one image: a Pillow image, a uint8 (H, W[, 1|3|4]) array or a file path,
        converted exactly as ``cifarlab predict`` converts files.

        Returns ``({class: probability}`` for the ``top_k`` most likely classes (clipped to
        1..min(10, classes)), most likely first; the CAM overlay (method ``cam``, one of
        ``config.CAM_METHODS``) for the predicted class (uint8 (224, 224, 3)) or None without
        ``show_cam``; the overlay for ``cam_class`` or None). CifarlabError (one line) for an
        unreadable or truncated image, a file over :data:`MAX_UPLOAD_BYTES`, an unknown
        layer, class or CAM method.
        """
        layer_name = self._layer(layer)
        method = _method(cam)
        extra = None if cam_class in _NO_FILTER or cam_class == "none" else self._class_index(cam_class)
        alpha = _clip(opacity, 0.0, 1.0)
        k = int(_clip(top_k, 1, min(MAX_TOP_K, len(self.classes))))
        pixels = to_pixels(image, MAX_UPLOAD_BYTES)
        images = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()
        maps = None
        with self._lock:
            probs = self._probs(self._inputs(images))[0]
            if show_cam:
                targets = [int(probs.argmax())] + ([extra] if extra is not None else [])
                maps = self._cam_maps(images.expand(len(targets), -1, -1, -1), targets, layer_name, method)
        top_p, top_i = probs.topk(k)
        scores = {self.classes[int(i)]: float(p) for p, i in zip(top_p, top_i)}
        if maps is None:
            return scores, None, None
        overlays = cam_overlays(pixels, maps, alpha)
        return scores, overlays[0], overlays[1] if extra is not None else None

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised model inputs, through the loader every prediction uses."""
        from cifarlab.data import DeviceLoader, Split

        loader = DeviceLoader(
            Split(images.contiguous(), torch.zeros(images.shape[0], dtype=torch.int64)),
            self._cfg.eval_batch_size,
            device=self.runtime.device,
            mean=self._mean,
            std=self._std,
            shuffle=False,
            channels_last=self.runtime.channels_last,
        )
        return torch.cat([x for x, _ in loader])

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax (N, C) on the CPU, with the run's TTA and precision."""
        from cifarlab.engine import run_epoch

        batch = [(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))]
        res = run_epoch(self.model, batch, self.runtime, tta=self._cfg.tta, collect=True)
        return res.logits.float().softmax(1)

    def _cam_maps(self, images: torch.Tensor, targets: list[int], layer: str, method: str) -> torch.Tensor:
        """Raw CAM maps (N, h, w) of uint8 ``images`` for the ``targets`` classes."""
        from cifarlab.explain.cams import layer_cams

        maps, _ = layer_cams(self.model, self._inputs(images), torch.tensor(targets, dtype=torch.int64), layer, method)
        return maps

    # ------------------------------------------------------------------ misclassified

    def misclassified(
        self,
        count: int = 10,
        show_cam: bool = False,
        actual: str | None = None,
        predicted: str | None = None,
        layer: str | None = None,
        opacity: float = 0.5,
        cam: str = "gradcam",
    ) -> list[tuple[np.ndarray, str]]:
        """The ``count`` (1..50) most confidently misclassified evaluation images, filtered by
        ``actual`` and/or ``predicted`` class (None or "any": no filter), each captioned
        ``"actual / predicted (p)"`` with p the predicted class's probability (2 decimals).

        Without ``show_cam`` each image is upscaled to (224, 224, 3); with it, the
        predicted-class and the actual-class CAM overlays (method ``cam``) side by side,
        (224, 448, 3).
        """
        a = None if actual in _NO_FILTER else self._class_index(actual)
        p = None if predicted in _NO_FILTER else self._class_index(predicted)
        layer_name = self._layer(layer)
        method = _method(cam)
        alpha = _clip(opacity, 0.0, 1.0)
        pool = self._pool
        idx = pool.select(a, p, int(_clip(count, 1, MAX_MISCLASSIFIED)))
        pictures = pool.images[idx].permute(0, 2, 3, 1).numpy()
        captions = [
            f"{self.classes[pool.targets[i]]} / {self.classes[pool.preds[i]]} ({pool.probs[i, pool.preds[i]]:.2f})" for i in idx
        ]
        if not show_cam:
            return [(upscale(pic), cap) for pic, cap in zip(pictures, captions)]
        if not captions:
            return []
        # (n, 2, h, w) maps -> 2n overlays, (predicted, actual) pairs side by side.
        maps = torch.cat(self._pool_maps(idx, layer_name, method))
        overlays = cam_overlays(np.repeat(pictures, 2, axis=0), maps, alpha)
        pairs = np.concatenate([overlays[0::2], overlays[1::2]], axis=2)
        return list(zip(pairs, captions))

    def _pool_maps(self, idx: np.ndarray, layer: str, method: str) -> list[torch.Tensor]:
        """(2, h, w) raw maps (predicted class, actual class) per pool image, cached per layer and method."""
        with self._lock:
            missing = [int(i) for i in idx if (layer, method, int(i)) not in self._maps]
            if missing:
                if len(self._maps) + len(missing) > _MAP_CACHE_MAX:
                    self._maps.clear()
                pool, m = self._pool, len(missing)
                images = pool.images[missing]
                targets = pool.preds[missing].tolist() + pool.targets[missing].tolist()
                maps = self._cam_maps(torch.cat([images, images]), targets, layer, method)
                for j, i in enumerate(missing):
                    self._maps[(layer, method, i)] = torch.stack([maps[j], maps[m + j]])
            return [self._maps[(layer, method, int(i))] for i in idx]

    # ------------------------------------------------------------------------- run tab

    def figures(self) -> dict[str, bytes]:
        """PNG bytes of the report's 'curves' (omitted when the source has no training
        history), 'per_class' and 'confusion' figures; rendered once, on first use."""
        with self._figure_lock:
            if self._figures is None:
                self._figures = run_figures(self._history, self._lrs, self.metrics)
            return dict(self._figures)

    def save_demo_data(self, path: str | Path) -> Path:
        """Write ``demo_data.npz`` (to ``path``, or into it when it is a folder): the
        misclassified pool, the examples, ``info``, ``metrics``, ``layers`` and the figures'
        PNGs, so that a folder holding it and ``model.safetensors`` needs no dataset;
        :meth:`load` reads it back. Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / DEMO_DATA_FILE
        data = DemoData(self.classes, self._pool, self.examples, self.info, self.metrics, self.layers, self.figures())
        return write_demo_data(path, data)

    # ----------------------------------------------------------------------- arguments

    def _layer(self, layer: str | None) -> str:
        if not layer:
            return self.default_layer
        if layer not in self.layers:
            raise CifarlabError(f"unknown layer '{layer}'; choose one of: {', '.join(self.layers)}")
        return layer

    def _class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise CifarlabError(f"unknown class '{name}'; the classes are: {', '.join(self.classes)}") from None


def _method(cam: Any) -> str:
    """The CAM method ``cam`` (empty: Grad-CAM), or a one-line error listing the methods."""
    from cifarlab.explain.cams import check_method

    return check_method(cam or "gradcam")


def _clip(value: Any, low: float, high: float) -> float:
    """``value`` as a number clipped to [low, high]; a non-number is a one-line error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CifarlabError(f"expected a number, got {value!r}") from None
    if number != number:  # NaN
        raise CifarlabError("expected a number, got NaN")
    return min(max(number, low), high)
