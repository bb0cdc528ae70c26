"""One report per run: ``RUN_DIR/report.html`` (self-contained) and ``RUN_DIR/README.md``.

The HTML embeds every image as a base64 ``data:`` URI and its CSS inline, references no
URL and needs no JavaScript, so it opens offline and can be mailed as one file. The
Markdown holds the same content with the PNGs saved beside it in ``report_files/``,
ready to paste into a repository.

Inputs come from the run directory (``checkpoints/last.pt``: config, history, LRs,
environment; ``lr_find.json``/``.png`` if the LR finder ran; ``predictions.npz``: the
final evaluation's test logits) so a finished run reports in seconds without another
pass over the test set. At the end of ``fit`` the model, data and logits already in
memory are handed over instead of being reloaded.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cifarlab.errors import CifarlabError

# Section ids, in page order. Tests check that every one is present in both outputs.
SECTIONS = (
    ("results", "Results"),
    ("timing", "Wall time"),
    ("environment", "Device and library versions"),
    ("config", "Resolved config"),
    ("model", "Model summary"),
    ("lr-finder", "LR finder"),
    ("curves", "Training curves"),
    ("per-class", "Per-class accuracy"),
    ("confusion", "Confusion matrix"),
    ("augmentations", "Augmented training samples"),
    ("misclassified", "Misclassified test images with Grad-CAM"),
    ("correct", "Correctly classified test images with Grad-CAM"),
    ("faithfulness", "Grad-CAM faithfulness"),
)
PREDICTIONS_FILE = "predictions.npz"
FILES_DIR = "report_files"
_AUGMENT_ROWS = 8


@dataclass
class Figure_:
    """A rendered figure: file name (in report_files/), alt text and PNG bytes."""

    name: str
    alt: str
    png: bytes


@dataclass
class ReportPaths:
    """Where the report went, and how long it took."""

    html: Path
    markdown: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------ predictions


def save_predictions(run_dir: str | Path, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> Path:
    """Store the final evaluation's test logits so reports need no new pass over the test set."""
    from cifarlab.checkpoint import atomic_write

    path = Path(run_dir) / PREDICTIONS_FILE

    def write(f) -> None:
        np.savez(f, logits=logits.float().cpu().numpy(), targets=targets.long().cpu().numpy(), epoch=np.int64(epoch))

    atomic_write(path, write)
    return path


def load_predictions(run_dir: str | Path, epoch: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored logits/targets if they belong to ``epoch`` and a test split of ``n_test`` images."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["epoch"]) != int(epoch) or z["targets"].shape[0] != n_test:
                return None
            return torch.from_numpy(z["logits"].copy()), torch.from_numpy(z["targets"].copy())
    except (OSError, KeyError, ValueError):
        return None  # unreadable: predict again


# ------------------------------------------------------------------------------ build


def build_report(
    run_dir: str | Path,
    *,
    model: nn.Module | None = None,
    dataset: Any = None,
    logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    device: str | None = None,
    data: str | None = None,
    n_misclassified: int = 20,
    n_correct: int = 10,
    layer: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ReportPaths:
    """Write ``report.html``, ``README.md`` and ``report_files/`` for a finished run directory.

    ``model``/``dataset``/``logits``/``targets`` (all from the same final model) skip
    reloading; without them the model comes from ``checkpoints/last.pt`` and the data from
    the run's config, or from ``data`` when the dataset has moved since training. The
    explanation files also land in ``RUN_DIR/explain/``.
    """
    from cifarlab.checkpoint import read_checkpoint
    from cifarlab.explain.galleries import explain_predictions, write_explanation
    from cifarlab.explain.overlay import figure_png
    from cifarlab.summary import model_summary

    t0 = last = time.perf_counter()
    timings: dict[str, float] = {}  # seconds per stage, for benchmarks/report_time.py

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        timings[name] = round(now - last, 3)
        last = now

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if not ckpt_path.is_file():
        raise CifarlabError(f"{run_dir} is not a finished run directory (no checkpoints/last.pt)")
    ckpt = read_checkpoint(ckpt_path)
    cfg = _config(ckpt)
    if model is None or dataset is None:
        from cifarlab.evaluate import load_for_inference

        overrides = {key: value for key, value in (("device", device), ("data", data)) if value}
        run = load_for_inference(str(ckpt_path), overrides or None)
        model, dataset, channels_last = run.model, run.dataset, run.channels_last
    else:
        run = None
        channels_last = _is_channels_last(model)
    lap("load")
    if logits is not None and logits.shape[0] != len(dataset.test):
        raise ValueError(f"{logits.shape[0]} logits for a test split of {len(dataset.test)} images")
    if logits is None or targets is None:
        stored = load_predictions(run_dir, int(ckpt["epoch"]), len(dataset.test))
        if stored is None:
            from cifarlab.engine import resolve_precision
            from cifarlab.evaluate import LoadedRun, predict_split

            if run is None:
                dev = next(model.parameters()).device
                run = LoadedRun(model, ckpt, cfg, dev, resolve_precision(cfg.precision, dev), channels_last, dataset)
            res = predict_split(run)
            logits, targets = res.logits, res.targets
            save_predictions(run_dir, logits, targets, int(ckpt["epoch"]))
        else:
            logits, targets = stored
    lap("predictions")

    from cifarlab.evaluate import metrics_from_logits

    classes = list(ckpt["classes"])
    mean, std = list(ckpt["mean"]), list(ckpt["std"])
    metrics = metrics_from_logits(logits, targets, classes)
    expl = explain_predictions(
        model,
        dataset.test.images,
        logits,
        targets,
        classes=classes,
        mean=mean,
        std=std,
        n_misclassified=n_misclassified,
        n_correct=n_correct,
        layer=layer,
        channels_last=channels_last,
    )
    lap("grad-cam")
    figures = _figures(ckpt, cfg, dataset, metrics, expl, run_dir, figure_png)
    lap("plots")
    # The galleries are already rendered for the report: hand the PNGs over, don't redraw.
    write_explanation(expl, run_dir / "explain", pngs={f.name: f.png for f in figures if f.name in ("misclassified", "correct")})
    lap("explain-files")
    summary = model_summary(_plain_model(model))
    lap("summary")
    context = _context(ckpt, cfg, dataset, metrics, expl, summary, run_dir)
    paths = _render(run_dir, context, figures)
    lap("render")
    paths.seconds = round(time.perf_counter() - t0, 3)
    paths.timings = timings
    if log is not None:
        log(f"report written to {paths.html} and {paths.markdown} in {paths.seconds:.1f}s")
    return paths


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _plain_model(model: nn.Module) -> nn.Module:
    from cifarlab.explain.gradcam import unwrap

    return unwrap(model)


def _config(ckpt: Mapping[str, Any]):
    from cifarlab.config import config_from_dict

    return config_from_dict({k: v for k, v in ckpt.get("config", {}).items() if v is not None})


def _augment_images(dataset) -> torch.Tensor:
    """The first training image of each of up to 8 classes (then more images if fewer classes)."""
    labels = dataset.train.labels
    picked: list[int] = []
    for c in range(int(labels.max()) + 1 if labels.numel() else 0):
        hits = (labels == c).nonzero().flatten()
        if hits.numel():
            picked.append(int(hits[0]))
        if len(picked) == _AUGMENT_ROWS:
            break
    for i in range(len(labels)):
        if len(picked) >= min(_AUGMENT_ROWS, len(labels)):
            break
        if i not in picked:
            picked.append(i)
    return dataset.train.images[sorted(picked)]


def _figures(ckpt, cfg, dataset, metrics, expl, run_dir: Path, figure_png) -> list[Figure_]:
    from cifarlab.data import AugmentSpec
    from cifarlab.report import plots

    out = []
    lr_png = run_dir / "lr_find.png"
    if lr_png.is_file():
        out.append(Figure_("lr_find", "loss against learning rate, suggestion marked", lr_png.read_bytes()))
    history = list(ckpt.get("history", []))
    out.append(Figure_("curves", "loss and accuracy per epoch, LR per step", figure_png(plots.curves_figure(history, ckpt.get("lrs", [])))))
    classes = list(metrics["per_class"])
    out.append(Figure_("per_class", "per-class test accuracy", figure_png(plots.per_class_figure(classes, list(metrics["per_class"].values())))))
    out.append(Figure_("confusion", "confusion matrix", figure_png(plots.confusion_figure(metrics["confusion"], classes))))
    spec = AugmentSpec.parse(cfg.augment)
    aug = plots.augmentation_figure(_augment_images(dataset), spec, ckpt["mean"], ckpt["std"], seed=cfg.seed)
    out.append(Figure_("augmentations", "augmented training samples", figure_png(aug)))
    for g in expl.galleries():
        out.append(Figure_(g.kind, f"{g.kind} test images with Grad-CAM", figure_png(g.figure(expl.classes))))
    return out


# Share of a gallery's images on which the CAM mask must beat the random one before the
# report says the maps matter: a coin flip is 50%, so ask for a clear majority.
_CLEAR_WIN_SHARE = 0.6


def faithfulness_verdict(f) -> str:
    """One phrase reading a gallery's deletion check (see explain.faithfulness)."""
    if f.n == 0:
        return "no images"
    if f.cam_drop <= 0:
        # Masking can raise a prediction (a low-confidence model, or masked pixels that
        # argued against the class): the map then shows nothing the prediction rests on.
        return "masking the highlighted pixels does not lower the prediction"
    if f.cam_drop > f.random_drop and f.cam_wins >= _CLEAR_WIN_SHARE:
        return "highlighted pixels matter more than random blobs"
    if f.cam_drop > f.random_drop:
        # A higher mean carried by a few images is not evidence about the typical map.
        return f"mixed: a larger drop on average, but on only {f.cam_wins:.0%} of the images"
    return "no better than masking random blobs"


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _context(ckpt, cfg, dataset, metrics, expl, summary, run_dir: Path) -> dict[str, Any]:
    """Everything both templates render, as plain values."""
    from cifarlab.config import to_toml
    from cifarlab.lr_finder import load_lr_find

    history = list(ckpt.get("history", []))
    synthetic = bool(ckpt.get("dataset", {}).get("synthetic"))
    results = []
    for split in ("train", "test"):
        rows = [r for r in history if r.get(f"{split}_acc") is not None]  # eval_every skips test rows
        if rows:
            best = max(rows, key=lambda r: r[f"{split}_acc"])
            results.append(
                {
                    "split": getattr(dataset, "eval_split", "test") if split == "test" else split,
                    "best": best[f"{split}_acc"],
                    "best_epoch": best["epoch"],
                    "last": history[-1][f"{split}_acc"],
                }
            )
    seconds = float(ckpt.get("seconds", sum(r.get("seconds", 0.0) for r in history)))
    n_epochs = len(history)
    timing = {
        "wall": _fmt_seconds(seconds),
        "wall_seconds": seconds,
        "epochs": n_epochs,
        "per_epoch": seconds / n_epochs if n_epochs else float("nan"),
        "train_per_epoch": (sum(r.get("train_seconds", 0.0) for r in history) / n_epochs) if n_epochs else float("nan"),
    }
    env = dict(ckpt.get("environment", {}))
    # "versions" repeats torch/cifarlab from the environment; show only what it adds.
    for k, v in dict(ckpt.get("versions", {})).items():
        if env.get(k) != v:
            env[f"{k} (versions)"] = v
    lr = load_lr_find(run_dir)
    cm = metrics["confusion"]
    counts = [int(sum(row)) for row in cm]
    per_class = [
        {"name": c, "acc": a, "n": n}
        for (c, a), n in zip(metrics["per_class"].items(), counts)
    ]
    worst = min(per_class, key=lambda r: (r["acc"] if not math.isnan(r["acc"]) else 2.0)) if per_class else None
    faith = []
    for g in expl.galleries():
        f = g.faithfulness
        faith.append(
            {
                "gallery": g.kind,
                "n": f.n,
                "cam_drop": f.cam_drop,
                "random_drop": f.random_drop,
                "cam_wins": f.cam_wins,
                "verdict": faithfulness_verdict(f),
            }
        )
    galleries = {
        g.kind: [
            {**row, "prob_text": f"{row['prob']:.2f}", "actual_prob_text": f"{row['actual_prob']:.2f}"}
            for row in g.rows(expl.classes)
        ]
        for g in expl.galleries()
    }
    ds = ckpt.get("dataset", {})
    data_words = (
        "SYNTHETIC data (procedurally generated patterns, not CIFAR-10)"
        if synthetic
        else f"{ds.get('name', '?')} data at {ds.get('root', '?')}"
    )
    return {
        "title": f"cifarlab report: {run_dir.name}",
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "synthetic": synthetic,
        "data_words": data_words,
        "n_train": len(dataset.train),
        "n_test": len(dataset.test),
        "eval_split": getattr(dataset, "eval_split", "test"),
        "model_name": ckpt["model"]["name"],
        "epoch": int(ckpt.get("epoch", 0)),
        "final_tta": history[-1].get("tta", cfg.tta) if history else cfg.tta,
        "results": results,
        "test_accuracy": metrics["accuracy"],
        "timing": timing,
        "environment": sorted(env.items()),
        "config_toml": to_toml(cfg),
        "summary": {
            "text": summary.text,
            "params": summary.params,
            "trainable": summary.trainable_params,
            "macs": summary.macs_per_image,
        },
        "lr_find": lr,
        "lr_auto": cfg.lr == "auto",
        "lr_value": cfg.lr,
        "per_class": per_class,
        "worst_class": worst,
        "classes": expl.classes,
        "confusion": cm,
        "augment": cfg.augment,
        "layer": expl.layer,
        "galleries": galleries,
        "faithfulness": faith,
        "faith_fraction": expl.misclassified.faithfulness.fraction,
        "sections": SECTIONS,
    }


# ----------------------------------------------------------------------------- render


def _md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _pct(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}%}"


def _num(value: float, spec: str = ".3g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def template_env(autoescape: bool):
    """The jinja2 environment over ``cifarlab/report/templates`` (autoescaped for HTML)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cifarlab.report", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    env.filters["md"] = _md_cell
    return env


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(template: str, context: dict[str, Any], figures: Sequence[Figure_]) -> str:
    """Render an HTML template with every figure embedded as a data URI (``images[name].src``)."""
    images = {f.name: {"src": data_uri(f.png), "alt": f.alt} for f in figures}
    return template_env(True).get_template(template).render(**context, images=images)


def _render(out_dir: Path, context: dict[str, Any], figures: Sequence[Figure_]) -> ReportPaths:
    """report.html (embedded images) and README.md (+ report_files/*.png) from one context."""
    html_path = out_dir / "report.html"
    html_path.write_text(render_html("report.html.j2", context, figures), encoding="utf-8")
    files_dir = out_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    md_images = {}
    files = []
    for f in figures:
        p = files_dir / f"{f.name}.png"
        p.write_bytes(f.png)
        files.append(p)
        md_images[f.name] = {"src": f"{FILES_DIR}/{p.name}", "alt": f.alt}
    md = template_env(False).get_template("report.md.j2").render(**context, images=md_images)
    md_path = out_dir / "README.md"
    md_path.write_text(md, encoding="utf-8")
    return ReportPaths(html=html_path, markdown=md_path, files=files)


def after_training(
    run_dir: str | Path,
    *,
    model: nn.Module,
    dataset: Any,
    final_eval: Any,
    epoch: int,
    write_report: bool,
    log: Callable[[str], None],
) -> ReportPaths | None:
    """End of ``fit``: store the final test predictions and, unless disabled, write the report.

    ``final_eval`` is the last epoch's collected ``EpochResult`` (None when no epoch ran).
    Nothing here may lose a trained run: the checkpoints are already on disk, so any
    failure is logged with the command that retries it, never raised.
    """
    try:
        logits = targets = None
        # Under DDP each rank evaluates a shard of the test split: such logits do not line
        # up with the split's images, so the report predicts the whole split itself.
        if final_eval is not None and final_eval.logits is not None and final_eval.logits.shape[0] == len(dataset.test):
            logits, targets = final_eval.logits, final_eval.targets
            save_predictions(run_dir, logits, targets, epoch)
        if not write_report:
            return None
        return build_report(run_dir, model=model, dataset=dataset, logits=logits, targets=targets, log=log)
    except Exception as exc:  # noqa: BLE001 - a report must never fail a finished training run
        log(
            f"warning: the report could not be written ({type(exc).__name__}: {exc}); "
            f"the trained run is saved. Retry with: cifarlab report {run_dir}"
        )
        return None
