"""Issue 24's benchmark: the airbench94_muon port and versus.py's bookkeeping.

The port runs for real on a few synthetic images (seconds); versus.py's arithmetic is
checked on hand-made per-epoch rows with known answers, and once end to end on tiny data.
No test looks at a wall-clock time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PORT = BENCH / "reference" / "airbench94_muon.py"
TINY = ["--dataset", "synthetic", "--limit-train", "200", "--limit-test", "100"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ab():
    return _load("airbench94_muon_port", PORT)


@pytest.fixture(scope="module")
def versus():
    return _load("versus_bench", BENCH / "versus.py")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ the port


def test_port_prints_one_json_line_with_the_results(tmp_path):
    proc = _run(str(PORT), *TINY, "--batch-size", "100", "--epochs", "2", "--whiten-bias-epochs", "1",
                "--eval-every-epoch", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # progress goes to stderr
    out = json.loads(lines[0])
    for key in ("acc", "acc_tta", "train_s", "wall_s", "epochs", "precision", "per_epoch"):
        assert key in out
    assert out["epochs"] == 2 and out["steps"] == 4  # 200 images / batch 100, 2 epochs
    assert out["n_train"] == 200 and out["n_eval"] == 100 and out["eval_split"] == "test"
    assert 0.0 <= out["acc"] <= 1.0 and 0.0 <= out["acc_tta"] <= 1.0
    assert out["precision"] in ("bf16", "fp32")
    assert out["wall_s"] >= out["train_s"] > 0 and out["eval_s"] > 0
    rows = out["per_epoch"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["acc"] is not None and rows[0]["acc_tta"] is None  # per-epoch eval: no TTA (published)
    assert rows[1]["acc_tta"] == out["acc_tta"] and rows[1]["acc"] == out["acc"]
    assert 0 < rows[0]["train_s_cum"] < rows[1]["train_s_cum"] <= out["train_s"]
    assert out["source"]["commit"] == "096d14d9aa92dcc837ab4f1f288dffea2bbe41b7"
    assert out["changed"] == {"epochs": 2.0, "batch_size": 100, "whiten_bias_epochs": 1.0}


def test_port_refuses_a_batch_larger_than_the_data():
    proc = _run(str(PORT), *TINY, "--epochs", "1")  # batch 2000 > 200 images
    assert proc.returncode == 2
    assert "lower --batch-size" in proc.stderr and proc.stdout == ""


def test_port_holdout_selects_cifarlabs_images(ab):
    """--holdout N evaluates on exactly the images `cifarlab train --holdout N` holds out."""
    from cifarlab.config import resolve_config
    from cifarlab.context import load_data

    args = ab.parse_args(["--dataset", "synthetic", "--holdout", "300"])
    ds = ab.load_splits(args)
    ref = load_data(resolve_config(overrides={"dataset": "synthetic", "holdout": 300}))
    assert ds.eval_split == "holdout" and len(ds.test) == 300
    assert torch.equal(ds.test.images, ref.test.images) and torch.equal(ds.train.labels, ref.train.labels)


def test_newton_schulz_brings_singular_values_near_one(ab):
    torch.manual_seed(0)
    for shape in ((64, 216), (300, 40)):
        g = torch.randn(*shape) * 7.0
        for dtype in (torch.float32, torch.bfloat16):
            x = ab.zeropower_via_newtonschulz5(g, dtype=dtype)
            assert x.shape == g.shape and x.dtype == dtype
            s = torch.linalg.svdvals(x.float())
            assert 0.5 < s.min() and s.max() < 1.5


def test_muon_resets_each_filter_bank_to_norm_sqrt_out_channels(ab):
    w = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 5)
    w.grad = torch.randn_like(w)
    opt = ab.Muon([w], lr=0.0, momentum=0.6, nesterov=True, ns_dtype=torch.float32)
    opt.step()  # lr 0: only the renormalisation acts
    assert math.isclose(w.norm().item(), math.sqrt(8), rel_tol=1e-5)


def test_batch_crop_takes_windows_within_the_padding(ab):
    torch.manual_seed(1)
    images = torch.arange(6 * 3 * 8 * 8, dtype=torch.float32).view(6, 3, 8, 8)
    padded = torch.nn.functional.pad(images, (2,) * 4, "reflect")
    out = ab.batch_crop(padded, 8)
    assert out.shape == images.shape
    for i in range(len(images)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_tta_is_exact_on_images_that_flips_and_shifts_leave_alone(ab):
    """A constant image is its own mirror and (reflect-padded) translation: TTA == plain."""
    torch.manual_seed(2)
    loader = ab.CifarLoader(torch.full((4, 3, 32, 32), 90, dtype=torch.uint8), torch.arange(4), False, 2000,
                            device=torch.device("cpu"), dtype=torch.float32, channels_last=False)
    model = ab.CifarNet()
    model.reset()
    plain = ab.infer(model, loader, tta_level=0)
    torch.testing.assert_close(ab.infer(model, loader, tta_level=2), plain, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ versus.py's bookkeeping

# Reference JSON per_epoch rows: plain accuracy per epoch, TTA on the last.
REF_RESULT = {"per_epoch": [
    {"epoch": 1, "train_s_cum": 10.0, "acc": 0.70, "acc_tta": None},
    {"epoch": 2, "train_s_cum": 20.0, "acc": 0.885, "acc_tta": None},
    {"epoch": 3, "train_s_cum": 30.0, "acc": 0.90, "acc_tta": 0.915},
]}
# cifarlab metrics.jsonl rows; epoch 2 was not evaluated.
LAB_METRICS = [
    {"epoch": 1, "train_seconds": 6.0, "test_acc": 0.80},
    {"epoch": 2, "train_seconds": 6.0, "test_acc": None},
    {"epoch": 3, "train_seconds": 6.5, "test_acc": 0.905},
]


def test_rows_score_the_last_epoch_with_tta_and_sum_training_seconds(versus):
    assert versus.reference_rows(REF_RESULT) == [
        {"epoch": 1, "train_s_cum": 10.0, "acc": 0.70},
        {"epoch": 2, "train_s_cum": 20.0, "acc": 0.885},
        {"epoch": 3, "train_s_cum": 30.0, "acc": 0.915},
    ]
    assert versus.cifarlab_rows(LAB_METRICS) == [
        {"epoch": 1, "train_s_cum": 6.0, "acc": 0.80},
        {"epoch": 3, "train_s_cum": 18.5, "acc": 0.905},  # epoch 2's seconds count, its row has no score
    ]


def test_seconds_to_is_the_first_epoch_at_or_above_each_threshold(versus):
    rows = versus.reference_rows(REF_RESULT)
    assert versus.seconds_to(rows) == {"0.88": 20.0, "0.90": 30.0, "0.91": 30.0, "0.93": None}
    assert versus.seconds_to(rows, ("0.70",)) == {"0.70": 10.0}  # "at or above"
    assert versus.seconds_to([], ("0.5",)) == {"0.5": None}


def _side(acc_key, accs, walls, trains, to):
    return [{"seed": i, acc_key: a, "wall_s": w, "train_s": t, "precision": "bf16",
             "seconds_to": {"0.88": s, "0.90": None, "0.91": None, "0.93": None}}
            for i, (a, w, t, s) in enumerate(zip(accs, walls, trains, to))]


def test_assemble_means_ratios_and_thresholds_reached_by_every_seed(versus):
    ref = _side("acc_tta", [0.91, 0.93], [100.0, 120.0], [80.0, 100.0], [50.0, 70.0])
    lab = _side("acc", [0.92, 0.94], [55.0, 55.0], [40.0, 50.0], [30.0, None])
    machine = {"cpu": "test cpu", "flags": ["avx2"]}
    out = versus.assemble(machine, {"seeds": 2}, ref, lab)
    assert out["reference"]["acc_tta"] == pytest.approx(0.92) and out["cifarlab"]["acc"] == pytest.approx(0.93)
    assert out["reference"]["wall_s"] == 110.0 and out["cifarlab"]["wall_s"] == 55.0
    assert out["time_ratio"] == 0.5 and out["train_time_ratio"] == 0.5
    assert out["acc_delta"] == pytest.approx(0.01)
    assert out["meets_target"] is True
    # cifarlab's seed 1 never reached 0.88: no mean, no ratio
    assert out["seconds_to"]["0.88"] == {"reference": 60.0, "cifarlab": None, "ratio": None}
    assert out["seconds_to_excludes_eval"] is True
    assert out["machine"]["precision"] == {"reference": ["bf16"], "cifarlab": ["bf16"]}
    assert out["seeds"] == 2 and len(out["reference"]["per_seed"]) == 2
    assert out["reference"]["acc_tta_std"] == pytest.approx(0.01414, abs=1e-4)


def test_assemble_misses_the_target_when_slower_or_less_accurate(versus):
    ref = _side("acc_tta", [0.92], [100.0], [80.0], [50.0])
    slower = versus.assemble({}, {}, ref, _side("acc", [0.93], [70.0], [60.0], [40.0]))
    assert slower["time_ratio"] == 0.7 and slower["meets_target"] is False
    worse = versus.assemble({}, {}, ref, _side("acc", [0.91], [50.0], [40.0], [40.0]))
    assert worse["acc_delta"] == pytest.approx(-0.01) and worse["meets_target"] is False
    assert worse["seconds_to"]["0.88"]["ratio"] == 0.8


def test_both_sides_get_the_same_data_flags(versus, tmp_path):
    args = versus.parse_args(["--data", "/d", "--holdout", "5000", "--limit-train", "1000", "--seeds", "2",
                              "--ref-args", "--tta-pad constant", "--", "--lr", "0.5"])
    ref, lab = versus.reference_cmd(args, 1), versus.cifarlab_cmd(args, 1, tmp_path / "r")
    data = ["--dataset", "imagefolder", "--data", "/d", "--holdout", "5000", "--limit-train", "1000"]
    for cmd in (ref, lab):
        assert cmd[cmd.index("--dataset"):cmd.index("--dataset") + len(data)] == data
        assert cmd[cmd.index("--seed") + 1] == "1"
    assert ref[-2:] == ["--tta-pad", "constant"] and "--eval-every-epoch" in ref
    assert lab[-2:] == ["--lr", "0.5"] and "--no-report" in lab and lab[lab.index("--eval-every") + 1] == "1"


def test_versus_end_to_end_on_tiny_synthetic_data(tmp_path):
    keep = tmp_path / "keep"
    proc = _run(str(BENCH / "versus.py"), *TINY, "--epochs", "1", "--batch-size", "100", "--no-warm",
                "--keep", str(keep), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["seconds_to"]) == {"0.88", "0.90", "0.91", "0.93"}
    assert out["seconds_to_excludes_eval"] is True
    for side, key in (("reference", "acc_tta"), ("cifarlab", "acc")):
        assert 0.0 <= out[side][key] <= 1.0 and out[side]["wall_s"] > 0
        assert out[side]["per_seed"][0]["epochs"] == 1
    assert out["time_ratio"] == round(out["cifarlab"]["wall_s"] / out["reference"]["wall_s"], 4)
    assert out["acc_delta"] == pytest.approx(out["cifarlab"]["acc"] - out["reference"]["acc_tta"], abs=1e-4)
    assert out["machine"]["threads"] == 1 and out["machine"]["cores"] >= 1
    assert (keep / "cifarlab-seed0" / "metrics.jsonl").is_file() and (keep / "reference-seed0.json").is_file()
    assert json.loads((keep / "versus.json").read_text())["time_ratio"] == out["time_ratio"]
