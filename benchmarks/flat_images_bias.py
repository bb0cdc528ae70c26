"""Why bf16 diverges on near-flat images: the whitening bias after each of the first steps.

Trains the `fast` net for its first few steps on the test suite's messy image folder
(307 readable images, almost all flat colours; tests/test_bad_input.py) with the CLI's
own code, and records the largest |bias| of the patch-whitening layer at each forward
pass, for fp32 and bf16. The README's precision section quotes it.

    python benchmarks/flat_images_bias.py

Last line: one JSON object {precision: {"bias_absmax": [...], "exit": code}}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3  # divergence shows by the third step

_CHILD = """
import json, sys
from cifarlab.cli import main
from cifarlab.models.fastnet import PatchWhitening

seen = []
forward = PatchWhitening.forward

def recording(self, x):
    if self.training and self.bias is not None:
        seen.append(float(self.bias.detach().abs().max()))
    return forward(self, x)

PatchWhitening.forward = recording
data, out, precision = sys.argv[1:4]
code = main(["train", "--dataset", "imagefolder", "--data", data, "--model", "fast", "--epochs", "1",
             "--batch-size", "64", "--limit-test", "2", "--device", "cpu", "--tta", "none", "--no-report",
             "--skip-bad", "--precision", precision, "--out", out])
print(json.dumps({"bias_absmax": seen[:%d], "exit": code}))
""" % STEPS


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    from tests.test_bad_input import messy_tree

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        messy_tree(root, filler=300)
        env = {**os.environ, "CIFARLAB_CACHE": str(Path(tmp) / "cache"), "OMP_NUM_THREADS": "1"}
        for precision in ("fp32", "bf16"):
            done = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(Path(tmp) / precision), precision],
                                  capture_output=True, text=True, env=env, timeout=600)
            results[precision] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{precision}: {results[precision]}", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
