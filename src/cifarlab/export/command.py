"""``cifarlab export``: its argparse subcommand and the command itself.

``cli.build_parser`` calls :func:`add_export_parser`; the parser it adds dispatches to
:func:`cmd_export`. Bad input ends as a one-line CifarlabError (exit 2); an export that
fails verification as :class:`cifarlab.export.errors.ExportFailed` (exit 4).
"""

from __future__ import annotations

import argparse

from cifarlab.errors import CifarlabError


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'dynamic', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'dynamic', got {text!r}")
    return value


def add_export_parser(sub, parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``sub`` (the subparsers of ``cifarlab``) and return it."""
    from cifarlab.export.pipeline import FORMATS, OUTPUT_NAMES
    from cifarlab.export.verify import DEFAULT_N
    from cifarlab.export.wrapper import TTAS

    names = ", ".join(f"{f}: {OUTPUT_NAMES[f]}" for f in FORMATS)
    p = sub.add_parser(
        "export",
        help="export a run to ONNX, torch.export (.pt2) or a Hugging Face-style folder, verified against the checkpoint",
        description=(
            "Export a trained model; every export is checked against the checkpoint on test images before it is kept. "
            "ONNX and .pt2 take uint8 RGB pixels (N, 3, 32, 32), 0..255, with the normalisation inside."
        ),
    )
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="a run directory or a checkpoint (.pt / .safetensors); with --check: the checkpoint to compare with")
    p.add_argument("--format", dest="formats", action="append", choices=FORMATS,
                   help=f"onnx | pt2 | hf; repeat for several (default: all three). Files in --out: {names}")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/export)")
    p.add_argument("--batch", type=_batch, default=None, metavar="N|dynamic",
                   help="batch size of the ONNX/.pt2 graph (default: dynamic)")
    p.add_argument("--tta", choices=TTAS, help="test-time augmentation inside the graph (default: as the run evaluated)")
    p.add_argument("--check", metavar="PATH", help="verify an existing export (.onnx, .pt2 or hf folder) again instead")
    p.add_argument("--n", type=int, default=DEFAULT_N, metavar="N", help=f"test images to verify on ({DEFAULT_N})")
    p.add_argument("--data", metavar="DIR", help="the run's dataset, if it moved since training (default: its config's path)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="device of the checkpoint's reference run and of the hf check (default: cpu; ONNX and .pt2 run on the CPU)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``cifarlab export`` (or ``--check``); returns the exit status."""
    from cifarlab.export.pipeline import FORMATS, check_export, export_source

    if args.n < 1:
        raise CifarlabError(f"--n must be >= 1, got {args.n}")
    if args.check:
        if args.formats or args.out or args.batch is not None or args.tta:
            raise CifarlabError("--check verifies an export as it is: it takes no --format, --out, --batch or --tta")
        check_export(args.check, source=args.source, n=args.n, device=args.device, data=args.data)
        return 0
    if not args.source:
        raise CifarlabError("give a run directory or checkpoint to export (cifarlab export RUN_DIR), or --check PATH")
    export_source(
        args.source,
        args.formats or list(FORMATS),
        out=args.out,
        batch=args.batch,
        n=args.n,
        device=args.device,
        tta=args.tta,
        data=args.data,
    )
    return 0
