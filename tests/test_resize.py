"""Progressive resizing: the schedule text, per-epoch sizes, the batch resize, the loader
applying it (reproducibly and resumably) and a run that uses it end to end."""

from __future__ import annotations

import pytest
import torch

from cifarlab.data import AugmentSpec, DeviceLoader, ResizeSchedule, Split, resize_batch, sources
from cifarlab.errors import CifarlabError
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "text, stages",
    [
        ("none", ()),
        ("", ()),
        ("24:0.5", ((24, 0.5),)),
        (" 20:0.25 , 24:0.25 ", ((20, 0.25), (24, 0.25))),
        ("16:0.99", ((16, 0.99),)),
    ],
)
def test_parse_good_and_round_trip(text, stages):
    schedule = ResizeSchedule.parse(text)
    assert schedule.stages == stages
    assert ResizeSchedule.parse(str(schedule)) == schedule
    assert schedule.enabled == bool(stages)


@pytest.mark.parametrize(
    "text, words",
    [
        ("24", "bad progressive_resize stage"),
        ("24:half", "bad progressive_resize stage"),
        ("x:0.5", "bad progressive_resize stage"),
        ("15:0.5", "size must be an integer >= 16"),
        ("24:0", "fraction must be in (0, 1)"),
        ("24:1", "fraction must be in (0, 1)"),
        ("20:0.5,24:0.5", "sum to less than 1"),
    ],
)
def test_parse_bad_is_a_one_line_error(text, words):
    with pytest.raises(CifarlabError) as err:
        ResizeSchedule.parse(text)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_epoch_sizes_follow_the_fractions_and_always_end_at_full_size():
    assert ResizeSchedule.parse("24:0.5").epoch_sizes(8) == (24,) * 4 + (None,) * 4
    assert ResizeSchedule.parse("20:0.25,24:0.25").epoch_sizes(8) == (20, 20, 24, 24, None, None, None, None)
    # 0.3 + 0.2 is 0.49999999999999994 in binary; 5 of 10 epochs are still low-res.
    assert ResizeSchedule.parse("20:0.3,24:0.2").epoch_sizes(10) == (20,) * 3 + (24,) * 2 + (None,) * 5
    # Short runs shrink the stages, never the full-size tail.
    assert ResizeSchedule.parse("24:0.5").epoch_sizes(1) == (None,)
    assert ResizeSchedule.parse("24:0.9").epoch_sizes(3) == (24, 24, None)
    for epochs in range(1, 30):
        assert ResizeSchedule.parse("20:0.45,24:0.5").epoch_sizes(epochs)[-1] is None
    assert ResizeSchedule().epoch_sizes(3) == (None, None, None)


def test_describe_names_the_epochs_one_based():
    assert ResizeSchedule.parse("24:0.5").describe(8) == "epochs 1-4 at 24 px"
    assert ResizeSchedule.parse("20:0.25,24:0.25").describe(4) == "epoch 1 at 20 px, epoch 2 at 24 px"
    assert ResizeSchedule.parse("24:0.5").describe(1) == ""


def test_sizes_must_shrink_the_images():
    schedule = ResizeSchedule.parse("24:0.5")
    schedule.check_images(32, 32)
    with pytest.raises(CifarlabError, match="smaller than the 24x24"):
        schedule.check_images(24, 24)


def test_resize_batch_keeps_aspect_dtype_and_constant_images():
    x = torch.full((2, 3, 32, 32), 0.7)
    out = resize_batch(x, 24)
    assert out.shape == (2, 3, 24, 24) and out.dtype == x.dtype
    torch.testing.assert_close(out, torch.full_like(out, 0.7))
    assert resize_batch(torch.zeros(1, 3, 32, 48), 24).shape == (1, 3, 24, 36)
    assert resize_batch(torch.zeros(1, 3, 48, 32), 24).shape == (1, 3, 36, 24)


def test_resize_batch_antialiases_a_pixel_checkerboard():
    # A 1-px checkerboard has no content a 24-px image can represent: antialiased
    # downscaling turns it (nearly) uniform grey; plain bilinear would alias it into stripes.
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float().expand(1, 3, 32, 32)
    out = resize_batch(board, 24)
    assert out.std() < 0.1 and abs(out.mean() - 0.5) < 0.05


@pytest.fixture(scope="module")
def tiny() -> sources.Dataset:
    images, labels = sources.generate_synthetic(96, 4, torch.Generator().manual_seed(0))
    mean, std = sources.channel_stats(images)
    return Split(images, labels), mean, std


def test_loader_resizes_the_augmented_batch_of_the_scheduled_epochs_only(tiny):
    split, mean, std = tiny
    kw = dict(device="cpu", mean=mean, std=std, shuffle=True, seed=5, augment=AugmentSpec.parse("translate:2,flip:alt"))
    full = DeviceLoader(split, 32, **kw)
    small = DeviceLoader(split, 32, epoch_sizes=(24, None), **kw)
    for epoch, size in ((0, 24), (1, 32), (2, 32)):  # epochs past the schedule are full size
        full.set_epoch(epoch)
        small.set_epoch(epoch)
        for (xf, yf), (xs, ys) in zip(full, small):
            assert xs.shape[-2:] == (size, size)
            assert torch.equal(ys, yf)
            # The same augmented images (same order, crops and flips), then downscaled.
            expected = resize_batch(xf, 24) if size == 24 else xf
            assert torch.equal(xs, expected)


def test_resized_epoch_resumes_mid_epoch_exactly(tiny):
    split, mean, std = tiny
    kw = dict(device="cpu", mean=mean, std=std, shuffle=True, seed=2, augment=AugmentSpec.parse("crop,flip"),
              epoch_sizes=(20,), channels_last=True)
    loader = DeviceLoader(split, 16, **kw)
    whole = list(loader)
    resumed = DeviceLoader(split, 16, **kw)
    tail = list(resumed.iter_from(2))
    assert len(tail) == len(whole) - 2
    for (xa, ya), (xb, yb) in zip(whole[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.shape[-2:] == (20, 20) and xb.is_contiguous(memory_format=torch.channels_last)


def test_cli_run_trains_small_first_and_evaluates_at_full_size(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train", "--preset", "fast", "--dataset", "synthetic", "--num-classes", "4", "--limit-train", "128",
        "--limit-test", "64", "--epochs", "2", "--batch-size", "32", "--lr", "0.2", "--tta", "none",
        "--eval-every", "1", "--progressive-resize", "24:0.5", "--device", "cpu", "--no-report", "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    log = (out / "log.txt").read_text()
    assert "progressive resize: epoch 1 at 24 px, the rest at full size" in log
    assert 'progressive_resize = "24:0.5"' in (out / "config.toml").read_text()
    assert log.count("test loss") == 2  # both epochs evaluated (at full size: the test loader never resizes)


def test_cli_bad_schedule_exits_2_with_one_line(tmp_path):
    proc = run_cli("train", "--dataset", "synthetic", "--progressive-resize", "24:1.5", "--out", str(tmp_path / "r"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "progressive_resize fraction" in lines[0]
    assert not (tmp_path / "r").exists()
