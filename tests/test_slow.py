"""Long runs, deselected by default: `make test PYTEST_ARGS="-m slow"`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"

pytestmark = pytest.mark.slow


def test_compiled_training_matches_the_plain_path(cli, tmp_path):
    """--compile trains and writes checkpoints without the _orig_mod prefix."""
    from cifarlab.checkpoint import load_checkpoint

    out = tmp_path / "run"
    proc = cli("train", "--preset", "fast", "--dataset", "synthetic", "--num-classes", "4", "--epochs", "2",
               "--batch-size", "64", "--lr", "0.2", "--limit-train", "512", "--limit-test", "256", "--device", "cpu",
               "--tta", "none", "--compile", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, info = load_checkpoint(out / "checkpoints" / "last.pt")
    assert info["config"]["compile"] is True
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_acc"] > 0.5


@pytest.mark.skipif(not REAL.is_dir(), reason="real CIFAR-10 JPEG copy not beside this checkout")
def test_one_epoch_of_fast_on_real_cifar10_is_far_above_chance(cli, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--data", str(REAL), "--dataset", "imagefolder", "--preset", "fast", "--epochs", "1",
               "--out", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["test_acc"] > 0.5  # chance is 0.1
