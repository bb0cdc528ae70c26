"""The ``cifarlab`` command: argparse subcommands, each a thin wrapper over a library call.

Every user error (bad flag, bad config value, missing data, unreadable checkpoint) ends
as one line on stderr, ``cifarlab: error: ...``, and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from cifarlab.errors import CifarlabError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _lr(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


# (flag, config key, type, help) for every config key a flag can override. Choices are
# validated by config.py (one place), except --model whose choices come from the registry.
_TRAIN_FLAGS: list[tuple[str, str, Callable | None, str]] = [
    ("--data", "data", str, "data root: holds cifar-10-batches-py/, or train/ and test/ class folders"),
    ("--dataset", "dataset", str, "cifar10 | imagefolder | synthetic"),
    ("--num-classes", "num_classes", int, "number of classes of synthetic data"),
    ("--model", "model", str, "model name (see `cifarlab summary --help`)"),
    ("--norm", "norm", str, "batch | group | layer"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--eval-batch-size", "eval_batch_size", int, "evaluation batch size"),
    ("--lr", "lr", _lr, "peak learning rate, or 'auto' to run the LR finder first"),
    ("--optimizer", "optimizer", str, "sgd | adam | adamw"),
    ("--momentum", "momentum", float, "SGD momentum / Adam beta1"),
    ("--scheduler", "scheduler", str, "onecycle | plateau | cosine | constant"),
    ("--weight-decay", "weight_decay", float, "weight decay (L2 for sgd/adam, decoupled for adamw)"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the training loss"),
    ("--dropout", "dropout", float, "dropout before the classifier"),
    ("--augment", "augment", str, "e.g. 'crop:4,flip,cutout:16,rotate:5' or 'none'"),
    ("--limit-train", "limit_train", int, "use a class-balanced subset of N training images"),
    ("--limit-test", "limit_test", int, "use a class-balanced subset of N test images"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--precision", "precision", str, "auto | fp32 | bf16 | fp16 (auto: bf16 where it is fast)"),
    ("--tta", "tta", str, "test-time augmentation: none | flip | flip-translate"),
    ("--seed", "seed", int, "random seed"),
    ("--out", "out", str, "run directory (default runs/<preset>-<timestamp>)"),
]


def _add_train_flags(p: argparse.ArgumentParser, model_choices: Sequence[str]) -> None:
    from cifarlab.config import list_presets

    p.add_argument("--preset", choices=list_presets(), help="start from a preset in configs/")
    p.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    for flag, key, typ, help_text in _TRAIN_FLAGS:
        extra: dict[str, Any] = {"choices": list(model_choices)} if key == "model" else {}
        p.add_argument(flag, dest=key, type=typ, default=None, help=help_text, **extra)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for _, key, _, _ in _TRAIN_FLAGS if getattr(args, key, None) is not None}


def _default_preset() -> str:
    import torch

    # ResNet18 for 20 epochs is a GPU recipe; on a CPU the fast net gets further in minutes.
    return "s11-resnet18-onecycle" if torch.cuda.is_available() else "fast"


# ---------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from cifarlab.config import resolve_config
    from cifarlab.train import fit

    preset = args.preset
    if preset is None and args.config is None:
        preset = _default_preset()
    cfg = resolve_config(preset=preset, config_file=args.config, overrides=_overrides(args))
    fit(cfg, resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cifarlab.evaluate import evaluate_checkpoint, format_metrics

    overrides = {
        k: v
        for k, v in {
            "data": args.data,
            "dataset": args.dataset,
            "limit_test": args.limit_test,
            "device": args.device,
            "eval_batch_size": args.batch_size,
            "tta": args.tta,
        }.items()
        if v is not None
    }
    metrics = evaluate_checkpoint(args.checkpoint, overrides)
    if args.json:
        print(json.dumps({k: metrics[k] for k in ("accuracy", "per_class", "confusion", "n", "dataset")}))
    else:
        print(format_metrics(metrics))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cifarlab.models import create_model
    from cifarlab.summary import model_summary

    model = create_model(args.model, num_classes=args.num_classes, norm=args.norm, dropout=0.0)
    print(model_summary(model).text)
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    from cifarlab.models import list_models

    models = list_models()
    parser = _Parser(prog="cifarlab", description="Train and inspect small-image classifiers.")
    from cifarlab import __version__

    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model; writes a run directory")
    _add_train_flags(p, models)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a .pt checkpoint or model.safetensors")
    p.add_argument("--data", help="data root (default: the one the model was trained on)")
    p.add_argument("--dataset", help="cifar10 | imagefolder | synthetic")
    p.add_argument("--limit-test", type=int, help="evaluate on a class-balanced subset")
    p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--tta", help="none | flip | flip-translate (default: as trained)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summary", help="layer table, parameter count and MACs of a model")
    p.add_argument("--model", required=True, choices=models)
    p.add_argument("--norm", default="batch", choices=["batch", "group", "layer"])
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cifarlab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CifarlabError as exc:
        print(f"cifarlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        return 130
