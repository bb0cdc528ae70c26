"""How often a two-process torchrun training loses a rank at exit.

Runs the test suite's tiny two-process training (tests/test_robustness.py's TINY flags,
gloo on the CPU, one thread per rank) N times and counts the runs that failed and the
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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ABORT = "terminate called without an active exception"
TINY = [
    "--preset", "fast", "--dataset", "synthetic", "--num-classes", "4", "--model", "fast", "--epochs", "2",
    "--batch-size", "32", "--lr", "0.2", "--limit-train", "256", "--limit-test", "128", "--device", "cpu",
    "--seed", "1", "--tta", "none", "--save-every-steps", "3", "--no-report", "--eval-every", "1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--fault", help="CIFARLAB_FAULT for every run, e.g. int@step=10/r0 (a SIGINT to rank 0 "
                                    "after step 10: every run then exits non-zero by design)")
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CIFARLAB_FAULT": args.fault} if args.fault else {})}
    failed = aborts = 0
    with tempfile.TemporaryDirectory() as tmp:
        env["CIFARLAB_CACHE"] = str(Path(tmp) / "cache")
        for i in range(args.runs):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={_free_port()}", "-m", "cifarlab", "train", *TINY, "--out", str(Path(tmp) / f"r{i}")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            failed += proc.returncode != 0
            aborts += ABORT in proc.stdout + proc.stderr
            print(f"run {i + 1}/{args.runs}: exit {proc.returncode}, {failed} failed, {aborts} teardown aborts",
                  file=sys.stderr)
    print(json.dumps({"runs": args.runs, "fault": args.fault, "failed": failed, "teardown_aborts": aborts,
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
