"""Time to accuracy: train a preset on real data for several seeds, report when test
accuracy first reached 0.90 / 0.91 / 0.93, the final accuracy and the wall time.

Each seed is one `cifarlab train` process. `wall_s` is that process's whole wall clock
(Python start, data loading from the warm cache, training, per-epoch evaluation, final
TTA evaluation; the HTML report is switched off). `seconds_to` uses the per-epoch
`elapsed` field of metrics.jsonl (seconds since training setup began, data loading
included), so it excludes only the interpreter/torch import. Run once beforehand to warm
the decode cache, or pass --warm.

    python benchmarks/time_to_accuracy.py --preset fast --data ../shared/datasets/cifar10-jpeg --seeds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THRESHOLDS = ("0.90", "0.91", "0.93")


def cli_supports(flag: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "cifarlab", "train", "--help"], capture_output=True, text=True)
    return flag in out.stdout


def run_seed(preset: str, data: str, seed: int, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "cifarlab", "train", "--preset", preset, "--dataset", "imagefolder",
           "--data", data, "--seed", str(seed), "--out", str(out), *extra]
    if cli_supports("--no-report"):
        cmd.append("--no-report")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds_to = {}
    for thr in THRESHOLDS:
        # rows of epochs that eval_every skipped have test_acc None
        hit = next((r for r in rows if r["test_acc"] is not None and r["test_acc"] >= float(thr)), None)
        seconds_to[thr] = hit["elapsed"] if hit else None
    result = {"seed": seed, "final_acc": rows[-1]["test_acc"], "wall_s": round(wall, 1), "seconds_to": seconds_to,
              "epochs": len(rows), "per_epoch_acc": [None if r["test_acc"] is None else round(r["test_acc"], 4) for r in rows]}
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--data", required=True, help="imagefolder root, e.g. ../shared/datasets/cifar10-jpeg")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--warm", action="store_true", help="load the data once first so the cache is warm")
    p.add_argument("--keep", help="keep run directories under this folder")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="extra `cifarlab train` flags after --")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]

    if args.warm:
        subprocess.run([sys.executable, "-c", f"from cifarlab.data import load_dataset; load_dataset('imagefolder', {args.data!r})"], check=True)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tta-"))
    runs = [run_seed(args.preset, args.data, s, extra, root / f"{args.preset}-seed{s}") for s in range(args.seeds)]

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    summary = {
        "preset": args.preset,
        "extra_args": extra,
        "seeds": args.seeds,
        "final_acc": med([r["final_acc"] for r in runs]),
        "final_acc_min": min(r["final_acc"] for r in runs),
        "final_acc_max": max(r["final_acc"] for r in runs),
        "wall_s": med([r["wall_s"] for r in runs]),
        "wall_s_max": max(r["wall_s"] for r in runs),
        # a threshold counts as reached only when the median seed reached it
        "seconds_to": {
            t: (med([r["seconds_to"][t] for r in runs]) if sum(r["seconds_to"][t] is not None for r in runs) * 2 > len(runs) else None)
            for t in THRESHOLDS
        },
        "runs": runs,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
