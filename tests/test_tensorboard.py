"""``--tensorboard``: RUN_DIR/tb/ holds the per-epoch scalars, the LR of every step, the
augmented-samples grid and the report's confusion matrix and misclassified gallery, read
back with TensorBoard's own event reader."""

from __future__ import annotations

import sys

import pytest

from tests.tiny_run import tiny_fit

pytest.importorskip("tensorboard")


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_run_holds_scalars_lr_and_images(tmp_path):
    result = tiny_fit(tmp_path / "run", report=True, tensorboard=True, limit_train=128, limit_test=64)
    acc = _events(tmp_path / "run")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr"}
    assert set(tags["images"]) == {"augmentations", "confusion_matrix", "misclassified"}
    history = result.history
    for tag, key in (("train/loss", "train_loss"), ("train/accuracy", "train_acc"), ("test/loss", "test_loss"), ("test/accuracy", "test_acc")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["epoch"] for r in history]
        assert [e.value for e in events] == pytest.approx([r[key] for r in history], rel=1e-6)
    lrs = acc.Scalars("lr")
    assert [e.step for e in lrs] == list(range(1, len(result.lrs) + 1))  # one per optimizer step
    assert [e.value for e in lrs] == pytest.approx(result.lrs, rel=1e-6)
    assert [e.step for e in acc.Images("augmentations")] == [0]
    for tag in ("confusion_matrix", "misclassified"):
        (image,) = acc.Images(tag)
        assert image.step == 2 and image.width > 100 and image.height > 100
        assert image.encoded_image_string.startswith(b"\x89PNG")


def test_resumed_run_appends_to_the_same_tb_dir(tmp_path):
    run = tmp_path / "run"
    # a constant LR may be stretched on --resume: train 1 epoch, then continue to 2
    tiny_fit(run, limit_train=128, limit_test=64, epochs=1, scheduler="constant", tensorboard=True)
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    from cifarlab.config import resolve_config
    from cifarlab.train import fit
    from cifarlab.report.build import report_on_finish

    cfg = resolve_config(overrides={"epochs": 2, "out": str(run), "device": "cpu"})
    fit(cfg, resume=True, resume_overrides={"epochs": 2}, progress=False, on_finish=report_on_finish(False))
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2
    acc = _events(run)
    assert [e.step for e in acc.Scalars("test/accuracy")] == [1, 2]
    assert [e.step for e in acc.Scalars("lr")] == list(range(1, 9))  # 4 steps per epoch
    assert [e.step for e in acc.Images("augmentations")] == [0]  # once, at the start of the run
    assert "confusion_matrix" not in acc.Tags()["images"]
    assert "they are the report's figures (no report was written)" in (run / "log.txt").read_text()


def test_missing_tensorboard_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    from cifarlab.cli import main

    # As if the extra were not installed: importing torch's SummaryWriter then fails.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--device", "cpu", "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "cifarlab: error: --tensorboard needs the tensorboard package: pip install 'cifarlab[tensorboard]'\n"
    assert not out.exists()
