"""How often a two-process torchrun training loses a rank at exit.

Runs the test suite's tiny two-process training (tests/test_robustness.py's ``torchrun``
with its TINY flags: gloo on the CPU, one thread per rank) N times and counts the runs that failed and the
runs where a rank died with "terminate called without an active exception" (SIGABRT in
the process-group teardown). Run it on a commit before and after a change to compare.

    python benchmarks/ddp_teardown.py --runs 40
    python benchmarks/ddp_teardown.py --runs 20 --fault int@step=10/r0

Last line: one JSON object {"runs", "failed", "teardown_aborts", "date"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ABORT = "terminate called without an active exception"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--fault", help="CIFARLAB_FAULT for every run, e.g. int@step=10/r0 (a SIGINT to rank 0 "
                                    "after step 10: every run then exits non-zero by design)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    # The tests' own launcher and flags, so this counts what the torchrun tests run.
    from tests.test_robustness import TINY, torchrun

    failed = aborts = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CIFARLAB_CACHE"] = str(Path(tmp) / "cache")
        for i in range(args.runs):
            proc = torchrun(*TINY, "--out", str(Path(tmp) / f"r{i}"), fault=args.fault)
            failed += proc.returncode != 0
            aborts += ABORT in proc.stdout + proc.stderr
            print(f"run {i + 1}/{args.runs}: exit {proc.returncode}, {failed} failed, {aborts} teardown aborts",
                  file=sys.stderr)
    print(json.dumps({"runs": args.runs, "fault": args.fault, "failed": failed, "teardown_aborts": aborts,
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
