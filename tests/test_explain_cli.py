"""``cifarlab explain`` on a tiny trained run: files, their contents, and that the chosen
images really are the most confidently misclassified / correct ones and the top losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tiny_run import shared_run


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    from cifarlab.cli import main

    ckpt = shared_run(tmp_path_factory) / "checkpoints" / "last.pt"
    out = tmp_path_factory.mktemp("explain") / "out"
    rc = main(["explain", "--checkpoint", str(ckpt), "--misclassified", "12", "--correct", "6", "--top-losses", "7", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    return ckpt, out


def test_writes_png_grids_json_and_npz(explained):
    _, out = explained
    for name in ("misclassified.png", "correct.png", "top_losses.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "explain.json").read_text())
    assert info["layer"] == "features.group1"
    assert info["classes"] == ["class0", "class1", "class2", "class3"]
    assert 0 < len(info["misclassified"]) <= 12 and len(info["correct"]) == 6 and len(info["top_losses"]) == 7
    rows = info["misclassified"] + info["correct"] + info["top_losses"]
    for row in rows:
        assert set(row) >= {"index", "actual", "predicted", "prob", "actual_prob", "loss"}
        assert row["actual"] in info["classes"] and 0 <= row["prob"] <= 1 and row["loss"] >= 0
    assert set(info["faithfulness"]) == {"misclassified", "correct", "top_losses"}
    assert {"cam_drop", "random_drop", "cam_wins", "n", "fraction"} <= set(info["faithfulness"]["misclassified"])
    for kind, faith in info["faithfulness"].items():  # ROAD beside the deletion check, per share removed
        road = faith["road"]
        assert road["n"] == faith["n"] == len(info[kind]) and road["removed"] == [0.2, 0.4, 0.6, 0.8], kind
        assert len(road["morf_drop"]) == len(road["lerf_drop"]) == 4, kind
        assert np.isfinite(road["morf_drop"] + road["lerf_drop"] + [road["morf_mean"], road["lerf_mean"]]).all(), kind

    with np.load(out / "cams.npz", allow_pickle=False) as z:
        n = len(rows)
        assert z["indices"].tolist() == [r["index"] for r in rows]
        assert z["gallery"].tolist() == [k for k in ("misclassified", "correct", "top_losses") for _ in info[k]]
        assert z["images"].dtype == np.uint8 and z["images"].shape == (n, 32, 32, 3)
        for key in ("cam_pred", "cam_true"):
            assert z[key].dtype == np.float32 and z[key].shape == (n, 32, 32)
            assert z[key].min() >= 0 and z[key].max() <= 1
        # right predictions: the actual class is the predicted one, so the two maps coincide
        right = z["preds"] == z["targets"]
        assert np.array_equal(z["cam_pred"][right], z["cam_true"][right])
        assert not np.array_equal(z["cam_pred"][~right], z["cam_true"][~right])
        assert str(z["layer"]) == "features.group1"


def test_selected_images_are_really_misclassified_and_sorted(explained):
    from cifarlab.evaluate import load_for_inference, predict_split

    ckpt, out = explained
    info = json.loads((out / "explain.json").read_text())
    run = load_for_inference(str(ckpt), {"device": "cpu"})
    res = predict_split(run)
    probs, preds = res.logits.softmax(1).max(1)
    mis = info["misclassified"]
    idx = torch.tensor([r["index"] for r in mis])
    assert (preds[idx] != res.targets[idx]).all()
    assert [r["predicted_id"] for r in mis] == preds[idx].tolist()
    shown = [r["prob"] for r in mis]
    assert shown == sorted(shown, reverse=True)
    # none of the misclassified images left out is more confident than the last one shown
    wrong = (preds != res.targets).nonzero().flatten()
    others = [i for i in wrong.tolist() if i not in set(idx.tolist())]
    if others:
        assert probs[others].max() <= shown[-1] + 1e-6
    cor = torch.tensor([r["index"] for r in info["correct"]])
    assert (preds[cor] == res.targets[cor]).all()
    # the top losses: highest cross-entropy of the actual class first, none left out higher
    losses = torch.nn.functional.cross_entropy(res.logits, res.targets, reduction="none")
    top = info["top_losses"]
    top_idx = torch.tensor([r["index"] for r in top])
    assert [r["loss"] for r in top] == pytest.approx(losses[top_idx].tolist(), rel=1e-4)
    assert [r["loss"] for r in top] == sorted((r["loss"] for r in top), reverse=True)
    assert losses[[i for i in range(len(losses)) if i not in set(top_idx.tolist())]].max() <= top[-1]["loss"] + 1e-5
    # the images in the npz are the test images at those indices
    with np.load(out / "cams.npz") as z:
        expected = run.dataset.test.images[torch.cat([idx, cor, top_idx])].permute(0, 2, 3, 1).numpy()
        assert np.array_equal(z["images"], expected)


def test_prints_a_line_per_gallery_and_refuses_negative_counts(explained, capsys):
    from cifarlab.cli import main

    ckpt, out = explained
    assert main(["explain", "--checkpoint", str(ckpt), "--top-losses", "-1", "--out", str(out / "x"), "--device", "cpu"]) == 2
    assert "--top-losses" in capsys.readouterr().err
    rc = main(["explain", "--checkpoint", str(ckpt), "--misclassified", "1", "--correct", "0", "--top-losses", "2",
               "--out", str(out / "y"), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top_losses: 2 images (loss " in printed and "misclassified: 1 images" in printed
    assert len(json.loads((out / "y" / "explain.json").read_text())["top_losses"]) == 2


def test_unknown_layer_is_a_one_line_error(explained, capsys):
    from cifarlab.cli import main

    ckpt, out = explained
    rc = main(["explain", "--checkpoint", str(ckpt), "--layer", "features.nope", "--out", str(out / "x"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown layer 'features.nope'" in err and "features.group1" in err and len(err.strip().splitlines()) == 1


def test_evaluate_min_count_keeps_the_pairs_seen_that_often(explained, capsys):
    from cifarlab.cli import main

    ckpt, _ = explained
    assert main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["most_confused"]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--json", "--min-count", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["most_confused"] == [p for p in every if p[2] >= 3]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--min-count", "0"]) == 2
    assert "--min-count" in capsys.readouterr().err


def test_default_method_is_gradcam_and_recorded(explained):
    _, out = explained
    assert json.loads((out / "explain.json").read_text())["method"] == "gradcam"
    with np.load(out / "cams.npz", allow_pickle=False) as z:
        assert str(z["method"]) == "gradcam"


def test_cam_flag_picks_the_method_and_writes_its_name(explained, capsys):
    from cifarlab.cli import main

    ckpt, out = explained
    rc = main(["explain", "--checkpoint", str(ckpt), "--cam", "layercam", "--misclassified", "3", "--correct", "2",
               "--top-losses", "0", "--out", str(out / "layercam"), "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("LayerCAM (layercam) layer features.group1;")
    info = json.loads((out / "layercam" / "explain.json").read_text())
    assert info["method"] == "layercam" and info["layer"] == "features.group1"
    with np.load(out / "layercam" / "cams.npz", allow_pickle=False) as z, np.load(out / "cams.npz") as default:
        assert str(z["method"]) == "layercam"
        # the same first images, explained by another method: other maps
        assert not np.allclose(z["cam_pred"][:3], default["cam_pred"][:3])
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--checkpoint", str(ckpt), "--cam", "nope", "--out", str(out / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_compare_cams_prints_one_table_and_writes_json(explained, capsys):
    from cifarlab.cli import main
    from cifarlab.config import CAM_METHODS

    ckpt, out = explained
    rc = main(["explain", "--checkpoint", str(ckpt), "--compare-cams", "--misclassified", "2", "--correct", "1",
               "--out", str(out / "compare"), "--device", "cpu"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["method", "seconds", "cam_drop"]
    assert [line.split()[0] for line in lines[1 : 1 + len(CAM_METHODS)]] == list(CAM_METHODS)
    data = json.loads((out / "compare" / "compare_cams.json").read_text())
    assert data["n_images"] == 3 and data["layer"] == "features.group1" and data["road_removed"] == [0.2, 0.4, 0.6, 0.8]
    for row in data["methods"]:
        assert row["seconds"] >= 0 and 0 <= row["cam_wins"] <= 1 and len(row["road_morf"]) == 4
        assert all(np.isfinite([row["cam_drop"], row["random_drop"], row["road_morf_drop"], row["road_lerf_drop"]]))
    assert not (out / "compare" / "explain.json").exists()  # the comparison only
    assert main(["explain", "--checkpoint", str(ckpt), "--compare-cams", "--cam", "gradcam", "--out", str(out / "x")]) == 2
    assert "--compare-cams compares every CAM method" in capsys.readouterr().err
