"""The template context of one run's report: every value both templates render, as plain data.

Built from the checkpoint (config, history, environment), the test metrics, the Grad-CAM
explanation and the model summary; the templates only format it.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

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
    ("top-losses", "Top losses"),
    ("faithfulness", "Grad-CAM faithfulness"),
)

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


def _results_rows(history: Sequence[Mapping[str, Any]], dataset) -> list[dict[str, Any]]:
    """Best (with its epoch) and last accuracy per split."""
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
    return results


def _timing(ckpt: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Wall time of the run, in total and per epoch."""
    seconds = float(ckpt.get("seconds", sum(r.get("seconds", 0.0) for r in history)))
    n_epochs = len(history)
    return {
        "wall": _fmt_seconds(seconds),
        "wall_seconds": seconds,
        "epochs": n_epochs,
        "per_epoch": seconds / n_epochs if n_epochs else float("nan"),
        "train_per_epoch": (sum(r.get("train_seconds", 0.0) for r in history) / n_epochs) if n_epochs else float("nan"),
    }


def _environment(ckpt: Mapping[str, Any]) -> list[tuple[str, Any]]:
    env = dict(ckpt.get("environment", {}))
    # "versions" repeats torch/cifarlab from the environment; show only what it adds.
    for k, v in dict(ckpt.get("versions", {})).items():
        if env.get(k) != v:
            env[f"{k} (versions)"] = v
    return sorted(env.items())


#: Most confused pairs the report lists under the confusion matrix.
MOST_CONFUSED_SHOWN = 10


def _per_class(metrics: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Accuracy (recall), precision, F1 and test-image count per class, and the worst class
    (NaN, a class with no images, never is)."""
    from cifarlab.metrics import classification_report

    counts = [int(sum(row)) for row in metrics["confusion"]]
    report = classification_report(metrics["confusion"], list(metrics["per_class"]))["per_class"]
    per_class = [
        {"name": c, "acc": a, "n": n, "precision": report[c]["precision"], "f1": report[c]["f1"]}
        for (c, a), n in zip(metrics["per_class"].items(), counts)
    ]
    worst = min(per_class, key=lambda r: (r["acc"] if not math.isnan(r["acc"]) else 2.0)) if per_class else None
    return per_class, worst


def _most_confused(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The most frequent (actual, predicted) mistakes, with each pair's share of the actual
    class, how many of its images the report shows and the name of their strip
    (``report.pairs``: HTML id and PNG name)."""
    from cifarlab.metrics import most_confused
    from cifarlab.report.pairs import PAIR_IMAGES, pair_name

    classes = list(metrics["per_class"])
    rows = []
    for actual, predicted, count in most_confused(metrics["confusion"], classes)[:MOST_CONFUSED_SHOWN]:
        a, p = classes.index(actual), classes.index(predicted)
        rows.append(
            {
                "actual": actual,
                "predicted": predicted,
                "actual_id": a,
                "predicted_id": p,
                "count": count,
                "share": count / sum(metrics["confusion"][a]),
                "shown": min(count, PAIR_IMAGES),
                "figure": pair_name(a, p, actual, predicted),
            }
        )
    return rows


def _faithfulness_rows(expl) -> list[dict[str, Any]]:
    rows = []
    for g in expl.galleries():
        f = g.faithfulness
        rows.append(
            {
                "gallery": g.kind,
                "n": f.n,
                "cam_drop": f.cam_drop,
                "random_drop": f.random_drop,
                "cam_wins": f.cam_wins,
                "verdict": faithfulness_verdict(f),
                "road_morf": g.road.morf_mean,  # ROAD drops averaged over the shares removed
                "road_lerf": g.road.lerf_mean,
            }
        )
    return rows


def _shares_text(shares: Sequence[float]) -> str:
    """(0.2, 0.4, 0.6, 0.8) -> "20, 40, 60 and 80%"."""
    pcts = [f"{round(100 * s):d}" for s in shares]
    return (", ".join(pcts[:-1]) + " and " + pcts[-1] if len(pcts) > 1 else "".join(pcts)) + "%"


def _galleries(expl) -> dict[str, list[dict[str, Any]]]:
    """Each gallery's table rows, probabilities already formatted."""
    return {
        g.kind: [
            {
                **row,
                "prob_text": f"{row['prob']:.2f}",
                "actual_prob_text": f"{row['actual_prob']:.2f}",
                "loss_text": f"{row['loss']:.3f}",
                "correct": row["actual_id"] == row["predicted_id"],
            }
            for row in g.rows(expl.classes)
        ]
        for g in expl.galleries()
    }


def _data_words(ckpt: Mapping[str, Any]) -> str:
    ds = ckpt.get("dataset", {})
    if ds.get("synthetic"):
        return "SYNTHETIC data (procedurally generated patterns, not CIFAR-10)"
    return f"{ds.get('name', '?')} data at {ds.get('root', '?')}"


def report_context(ckpt: Mapping[str, Any], cfg, dataset, metrics: Mapping[str, Any], expl, summary, run_dir: Path) -> dict[str, Any]:
    """Everything both templates render, as plain values."""
    from cifarlab.config import to_toml
    from cifarlab.lr_finder import load_lr_find

    history = list(ckpt.get("history", []))
    per_class, worst = _per_class(metrics)
    return {
        "title": f"cifarlab report: {run_dir.name}",
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "synthetic": bool(ckpt.get("dataset", {}).get("synthetic")),
        "data_words": _data_words(ckpt),
        "n_train": len(dataset.train),
        "n_test": len(dataset.test),
        "eval_split": getattr(dataset, "eval_split", "test"),
        "model_name": ckpt["model"]["name"],
        "epoch": int(ckpt.get("epoch", 0)),
        "final_tta": history[-1].get("tta", cfg.tta) if history else cfg.tta,
        "results": _results_rows(history, dataset),
        "test_accuracy": metrics["accuracy"],
        "timing": _timing(ckpt, history),
        "environment": _environment(ckpt),
        "config_toml": to_toml(cfg),
        "summary": {
            "text": summary.text,
            "params": summary.params,
            "trainable": summary.trainable_params,
            "macs": summary.macs_per_image,
        },
        "lr_find": load_lr_find(run_dir),
        "lr_auto": cfg.lr == "auto",
        "lr_value": cfg.lr,
        "per_class": per_class,
        "worst_class": worst,
        "classes": expl.classes,
        "confusion": metrics["confusion"],
        "most_confused": _most_confused(metrics),
        "augment": cfg.augment,
        "layer": expl.layer,
        "galleries": _galleries(expl),
        "faithfulness": _faithfulness_rows(expl),
        "faith_fraction": expl.misclassified.faithfulness.fraction,
        "road_removed": _shares_text(expl.misclassified.road.removed),
        "sections": SECTIONS,
    }
