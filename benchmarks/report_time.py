"""How long the report of a finished run takes: ``cifarlab report RUN_DIR`` in-process.

Covers everything the report does: loading the checkpoint and the run's data (decode
cache), reusing the final test predictions stored by training (``predictions.npz``),
Grad-CAM of the 20 most confidently misclassified + 10 correct test images (predicted
and actual class), the faithfulness check, every plot, the model summary, and writing
report.html, README.md, report_files/ and explain/. The first call also pays the
imports (matplotlib, pytorch-grad-cam, jinja2); later calls show the steady state.

    python benchmarks/report_time.py runs/fast-20261122-101500 [--repeat 3]

Prints a per-stage table, then one JSON line (last line) with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished run directory (has checkpoints/last.pt)")
    p.add_argument("--repeat", type=int, default=3, help="report builds to time (the first includes imports)")
    p.add_argument("--misclassified", type=int, default=20)
    p.add_argument("--correct", type=int, default=10)
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's own)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    had_predictions = (run_dir / "predictions.npz").is_file()

    t0 = time.perf_counter()
    import torch

    from cifarlab.report.build import build_report

    import_torch = time.perf_counter() - t0
    runs = []
    for i in range(max(1, args.repeat)):
        start = time.perf_counter()
        paths = build_report(
            run_dir, device=args.device, n_misclassified=args.misclassified, n_correct=args.correct
        )
        total = time.perf_counter() - start
        # The first build includes the report's own imports (matplotlib, pytorch-grad-cam, jinja2).
        runs.append({"seconds": round(total, 3), "stages": paths.timings})
        print(f"build {i + 1}: {total:6.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in paths.timings.items()), file=sys.stderr)
    result = {
        "benchmark": "report_time",
        "run_dir": str(run_dir),
        "misclassified": args.misclassified,
        "correct": args.correct,
        "reused_predictions": had_predictions,
        "first_seconds": runs[0]["seconds"],
        "best_seconds": min(r["seconds"] for r in runs),
        "runs": runs,
        "import_torch_and_cifarlab_seconds": round(import_torch, 3),
        "html_bytes": (run_dir / "report.html").stat().st_size,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": str(torch.__version__),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
