"""One report per run: ``RUN_DIR/report.html`` (self-contained) and ``RUN_DIR/README.md``.

Inputs come from the run directory (``checkpoints/last.pt``: config, history, LRs,
environment; ``lr_find.json``/``.png`` if the LR finder ran; ``predictions.npz``: the
final evaluation's test logits) so a finished run reports in seconds without another
pass over the test set. At the end of ``fit`` the model, data and logits already in
memory are handed over instead of being reloaded.

This module runs the stages; ``predictions`` stores the logits, ``figures`` draws,
``context`` gathers what the templates show and ``render`` writes the files. The names
other modules and tests import from here are re-exported below.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.report.context import SECTIONS, faithfulness_verdict, report_context
from cifarlab.report.figures import report_figures
from cifarlab.report.predictions import PREDICTIONS_FILE, load_predictions, save_predictions
from cifarlab.report.render import FILES_DIR, Figure_, ReportPaths, data_uri, render_html, render_report, template_env

__all__ = [
    "FILES_DIR",
    "PREDICTIONS_FILE",
    "SECTIONS",
    "Figure_",
    "ReportPaths",
    "after_training",
    "build_report",
    "data_uri",
    "faithfulness_verdict",
    "load_predictions",
    "render_html",
    "report_on_finish",
    "save_predictions",
    "template_env",
]


class _Stopwatch:
    """Seconds per stage, for benchmarks/report_time.py."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


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
    n_top_losses: int = 10,
    cam: str | None = None,
) -> ReportPaths:
    """Write ``report.html``, ``README.md`` and ``report_files/`` for a finished run directory.

    ``model``/``dataset``/``logits``/``targets`` (all from the same final model) skip
    reloading; without them the model comes from ``checkpoints/last.pt`` and the data from
    the run's config, or from ``data`` when the dataset has moved since training. The
    explanation files also land in ``RUN_DIR/explain/``. ``cam`` is the CAM method
    (default: the run's config key ``cam``).
    """
    clock = _Stopwatch()
    run_dir = Path(run_dir)
    ckpt, cfg, run = _load_run(run_dir, model, dataset, device=device, data=data)
    clock.lap("load")
    logits, targets = _test_predictions(run_dir, ckpt, run, logits, targets)
    clock.lap("predictions")
    paths = _explain_and_render(
        run_dir,
        ckpt,
        cfg,
        run,
        logits,
        targets,
        clock,
        n_misclassified=n_misclassified,
        n_correct=n_correct,
        n_top_losses=n_top_losses,
        layer=layer,
        cam=cam or cfg.cam,
    )
    paths.seconds = clock.total()
    paths.timings = clock.timings
    if log is not None:
        log(f"report written to {paths.html} and {paths.markdown} in {paths.seconds:.1f}s")
    return paths


def _load_run(run_dir: Path, model: nn.Module | None, dataset: Any, *, device: str | None, data: str | None):
    """The run's checkpoint, its stored config, and a ``LoadedRun`` of the given model and
    data, or of ones rebuilt from the checkpoint when either is missing."""
    from cifarlab.checkpoint import read_checkpoint
    from cifarlab.evaluate import load_for_inference, run_from_model
    from cifarlab.rundir import RunDir

    ckpt_path = RunDir(run_dir).last
    if not ckpt_path.is_file():
        raise CifarlabError(f"{run_dir} is not a finished run directory (no checkpoints/last.pt)")
    ckpt = read_checkpoint(ckpt_path)
    cfg = _config(ckpt)
    if model is None or dataset is None:
        overrides = {key: value for key, value in (("device", device), ("data", data)) if value}
        run = load_for_inference(str(ckpt_path), overrides or None)
    else:
        run = run_from_model(model, ckpt, cfg, dataset)
    return ckpt, cfg, run


def _test_predictions(
    run_dir: Path, ckpt: Mapping[str, Any], run, logits: torch.Tensor | None, targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final model's test logits and targets: as given, as stored by training, or
    predicted now (and stored for the next report)."""
    n_test = len(run.dataset.test)
    if logits is not None and logits.shape[0] != n_test:
        raise ValueError(f"{logits.shape[0]} logits for a test split of {n_test} images")
    if logits is not None and targets is not None:
        return logits, targets
    stored = load_predictions(run_dir, int(ckpt["epoch"]), n_test)
    if stored is not None:
        return stored
    from cifarlab.evaluate import predict_split

    res = predict_split(run)
    save_predictions(run_dir, res.logits, res.targets, int(ckpt["epoch"]))
    return res.logits, res.targets


def _explain_and_render(
    run_dir: Path,
    ckpt: Mapping[str, Any],
    cfg,
    run,
    logits: torch.Tensor,
    targets: torch.Tensor,
    clock: _Stopwatch,
    *,
    n_misclassified: int,
    n_correct: int,
    n_top_losses: int,
    layer: str | None,
    cam: str,
) -> ReportPaths:
    """Metrics, CAM galleries, figures, model summary, then the report and explain/ files."""
    from cifarlab.evaluate import metrics_from_logits
    from cifarlab.explain.cams import cam_title
    from cifarlab.explain.galleries import GALLERIES, explain_predictions, write_explanation
    from cifarlab.report.pairs import pair_figures
    from cifarlab.summary import model_summary

    classes = list(ckpt["classes"])
    metrics = metrics_from_logits(logits, targets, classes)
    expl = explain_predictions(
        run.model,
        run.dataset.test.images,
        logits,
        targets,
        classes=classes,
        mean=list(ckpt["mean"]),
        std=list(ckpt["std"]),
        n_misclassified=n_misclassified,
        n_correct=n_correct,
        layer=layer,
        channels_last=run.runtime.channels_last,
        n_top_losses=n_top_losses,
        cam=cam,
    )
    clock.lap("grad-cam")
    figures = report_figures(ckpt, cfg, run.dataset, metrics, expl, run_dir)
    clock.lap("plots")
    # The galleries are already rendered for the report: hand the PNGs over, don't redraw.
    write_explanation(expl, run_dir / "explain", pngs={f.name: f.png for f in figures if f.name in GALLERIES})
    clock.lap("explain-files")
    summary = model_summary(_plain_model(run.model))
    clock.lap("summary")
    context = report_context(ckpt, cfg, run.dataset, metrics, expl, summary, run_dir)
    context["cam_title"] = cam_title(expl.method)  # the templates' CAM headings
    figures += pair_figures(context["most_confused"], logits, targets, run.dataset.test.images)
    clock.lap("confused-pairs")
    paths = render_report(run_dir, context, figures)
    clock.lap("render")
    return paths


def _plain_model(model: nn.Module) -> nn.Module:
    from cifarlab.explain.layers import unwrap

    return unwrap(model)


def _config(ckpt: Mapping[str, Any]):
    from cifarlab.config import config_from_dict

    return config_from_dict({k: v for k, v in ckpt.get("config", {}).items() if v is not None})


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


def report_on_finish(write_report: bool = True) -> Callable[[Any], None]:
    """An ``on_finish`` callback for :func:`cifarlab.train.fit` that calls :func:`after_training`:
    ``fit(cfg, on_finish=report_on_finish())`` trains and reports as ``cifarlab train`` does."""

    def on_finish(done) -> None:  # a cifarlab.train.FinishedRun
        paths = after_training(
            done.run_dir,
            model=done.model,
            dataset=done.dataset,
            final_eval=done.final_eval,
            epoch=done.epoch,
            write_report=write_report,
            log=done.log,
        )
        _figures_to_tensorboard(done.run_dir, paths, done.epoch, done.log)

    return on_finish


# Report figures (report_files/<name>.png) that a --tensorboard run also logs at its end.
TENSORBOARD_FIGURES = {"confusion_matrix": "confusion", "misclassified": "misclassified"}


def _figures_to_tensorboard(run_dir: str | Path, paths: ReportPaths | None, epoch: int, log: Callable[[str], None]) -> None:
    """With --tensorboard (the run has ``tb/``): add the report's confusion matrix and
    misclassified gallery as images at the last epoch. Never fails the finished run."""
    from cifarlab.tblog import TB_DIR, write_pngs

    if not (Path(run_dir) / TB_DIR).is_dir():
        return
    if paths is None:
        log("tensorboard: no confusion matrix or misclassified images: they are the report's figures (no report was written)")
        return
    files = Path(run_dir) / FILES_DIR
    try:
        write_pngs(run_dir, {tag: files / f"{name}.png" for tag, name in TENSORBOARD_FIGURES.items()}, epoch)
    except Exception as exc:  # noqa: BLE001 - a log must never fail a finished training run
        log(f"warning: the report's figures could not be added to TensorBoard ({type(exc).__name__}: {exc})")
