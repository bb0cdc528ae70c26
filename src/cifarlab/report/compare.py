"""``cifarlab report --compare RUN_DIR...``: one self-contained HTML page comparing runs.

Shows a table of final and best accuracy, wall time and the main settings, the runs'
curves overlaid, and per-class accuracy side by side. Runs whose configs differ only in
their seed (``train --seeds``) also get the mean ± std, min and max of those accuracies. Per-class numbers come from each
run's ``predictions.npz`` (written at the end of training); a run without one is
evaluated on its test split once.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cifarlab.errors import CifarlabError


@dataclass
class _Run:
    name: str
    path: Path
    ckpt: dict[str, Any]
    per_class: dict[str, float]


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, with parent folders added where two runs share a name."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(p.parent.name) / p.name) for p in paths]


def _load_run(path: Path, name: str, device: str | None) -> _Run:
    from cifarlab.checkpoint import read_checkpoint
    from cifarlab.evaluate import metrics_from_logits
    from cifarlab.report.predictions import load_predictions
    from cifarlab.rundir import RunDir

    ckpt_path = RunDir(path).last
    if not ckpt_path.is_file():
        raise CifarlabError(f"{path} is not a finished run directory (no checkpoints/last.pt)")
    ckpt = read_checkpoint(ckpt_path)
    ckpt.pop("optimizer", None)
    ckpt.pop("state_dict", None)
    classes = list(ckpt["classes"])
    n_test = _stored_test_size(path)
    stored = load_predictions(path, int(ckpt["epoch"]), n_test) if n_test is not None else None
    if stored is not None:
        per_class = metrics_from_logits(stored[0], stored[1], classes)["per_class"]
    else:
        from cifarlab.evaluate import evaluate_checkpoint

        per_class = evaluate_checkpoint(str(ckpt_path), {"device": device} if device else None)["per_class"]
    return _Run(name, path, ckpt, per_class)


def _stored_test_size(path: Path) -> int | None:
    import numpy as np

    from cifarlab.report.predictions import PREDICTIONS_FILE

    f = path / PREDICTIONS_FILE
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            return int(z["targets"].shape[0])
    except (OSError, KeyError, ValueError):
        return None


# Keys that may differ between runs of one experiment repeated over seeds: the seed, where
# it went, and settings that only change logging and checkpointing, never the numbers.
_NOT_THE_EXPERIMENT = frozenset({"seed", "out", "log_every", "save_every_steps", "tensorboard"})


def differ_only_in_seed(configs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether two or more stored configs are one experiment over distinct seeds: equal on
    every key but the seed, the run directory and logging-only keys (log_every,
    save_every_steps, tensorboard). A key one config lacks counts as its default."""
    from cifarlab.config import TrainConfig

    defaults = TrainConfig().to_dict()
    rest = [{k: c.get(k, defaults.get(k)) for k in set(defaults) | set(c) if k not in _NOT_THE_EXPERIMENT} for c in configs]
    seeds = [c.get("seed", defaults["seed"]) for c in configs]
    return len(configs) >= 2 and all(r == rest[0] for r in rest) and len(set(seeds)) == len(seeds)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """mean, std, min and max of ``values``; std is the sample standard deviation (n - 1),
    None for a single value. NaNs (runs never evaluated) are left out."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
    }


def _seed_stats(configs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The mean ± std (min, max) row of the results table, when the runs differ only in seed."""
    if not differ_only_in_seed(configs):
        return None
    return {
        "n": len(rows),
        "seeds": [c.get("seed") for c in configs],
        "final": spread([r["final"] for r in rows]),
        "best": spread([r["best"] for r in rows]),
    }


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None, device: str | None = None) -> Path:
    """Write the comparison page for ``run_dirs``; return its path (default ``runs/compare-<UTC stamp>.html``)."""
    from cifarlab.explain.overlay import figure_png
    from cifarlab.lr_finder import load_lr_find
    from cifarlab.report import plots
    from cifarlab.report.render import Figure_, render_html

    if len(run_dirs) < 2:
        raise CifarlabError("report --compare needs at least two run directories")
    paths = [Path(p) for p in run_dirs]
    runs = [_load_run(p, n, device) for p, n in zip(paths, _unique_names(paths))]
    rows = []
    for r in runs:
        hist = list(r.ckpt.get("history", []))
        cfg = r.ckpt.get("config", {})
        evaluated = [h for h in hist if h.get("test_acc") is not None]  # eval_every may skip epochs
        best = max(evaluated, key=lambda h: h["test_acc"]) if evaluated else None
        seconds = float(r.ckpt.get("seconds", 0.0))
        lr = load_lr_find(r.path)
        rows.append(
            {
                "name": r.name,
                "model": r.ckpt["model"]["name"],
                "data": "SYNTHETIC" if r.ckpt.get("dataset", {}).get("synthetic") else r.ckpt.get("dataset", {}).get("name", "?"),
                "epochs": len(hist),
                "final": hist[-1]["test_acc"] if hist else float("nan"),
                "best": best["test_acc"] if best else float("nan"),
                "best_epoch": best["epoch"] if best else 0,
                "wall": seconds,
                "per_epoch": seconds / len(hist) if hist else float("nan"),
                "lr": f"auto ({lr['suggestion']:.3g})" if lr and cfg.get("lr") == "auto" else str(cfg.get("lr")),
                "batch_size": cfg.get("batch_size"),
                "augment": cfg.get("augment"),
            }
        )
    classes = list(runs[0].per_class)
    same = [r for r in runs if list(r.per_class) == classes]
    figures = [
        Figure_("curves", "test accuracy and loss of all runs per epoch", figure_png(plots.compare_curves_figure([(r.name, r.ckpt.get("history", [])) for r in runs]))),
        Figure_("per_class", "per-class accuracy side by side", figure_png(plots.compare_per_class_figure(classes, [(r.name, list(r.per_class.values())) for r in same]))),
    ]
    context = {
        "title": f"cifarlab comparison of {len(runs)} runs",
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows,
        "classes": classes,
        "per_class": [{"name": r.name, "acc": [r.per_class[c] for c in classes]} for r in same],
        "skipped": [r.name for r in runs if r not in same],
        "synthetic": [row["name"] for row in rows if row["data"] == "SYNTHETIC"],
        "seed_stats": _seed_stats([r.ckpt.get("config", {}) for r in runs], rows),
    }
    if out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"compare-{stamp}.html"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html("compare.html.j2", context, figures), encoding="utf-8")
    return out
