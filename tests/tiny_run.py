"""Tiny training runs on synthetic data for the explain/predict/report tests.

Training is the expensive part of these tests (the fast net costs ~10 ms per image-step
on 2 CPU cores), so one ``--lr auto`` run with its report is trained once per test
session and shared, read-only, by every module that needs a finished run. A test that
changes files copies the run directory first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(
    dataset="synthetic",
    num_classes=4,
    epochs=2,
    batch_size=32,
    lr=0.2,
    limit_train=256,
    limit_test=128,
    device="cpu",
    tta="none",
    seed=1,
    eval_every=1,  # the fast preset evaluates only after the last epoch; these runs want every epoch
    # a warm-up phase, so the first LR is max_lr / div_factor (the preset starts at its peak)
    pct_start=0.25,
    div_factor=10.0,
)

_SHARED: dict[str, Path] = {}


def tiny_fit(out: Path, *, report: bool = False, **overrides):
    """Train the fast net for 2 epochs on 256 synthetic images; return fit()'s RunResult."""
    import io

    from cifarlab.config import resolve_config
    from cifarlab.report.build import report_on_finish
    from cifarlab.train import fit

    cfg = resolve_config(preset="fast", overrides={**TINY, **overrides, "out": str(out)})
    # The report is attached as `cifarlab train` attaches it (predictions.npz either way).
    return fit(cfg, progress=False, stream=io.StringIO(), on_finish=report_on_finish(report))


def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a tiny ``--lr auto`` run with its report, trained once per session.

    The LR sweep is shortened to 20 steps from 1e-5 (instead of 50+ from 1e-7): the
    sweep's quality is tested in test_lr_finder.py; here it only has to run end to end.
    """
    if "run" not in _SHARED:
        from cifarlab import lr_finder

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lr_finder, "AUTO_MIN_STEPS", 20)
            mp.setattr(lr_finder, "DEFAULT_START", 1e-5)
            result = tiny_fit(tmp_path_factory.mktemp("shared") / "run", report=True, lr="auto")
        _SHARED["run"] = result.run_dir
    return _SHARED["run"]
