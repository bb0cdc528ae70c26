"""``cifarlab explain`` on a tiny trained run: files, their contents, and that the chosen
images really are the most confidently misclassified / correct ones."""

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
    rc = main(["explain", "--checkpoint", str(ckpt), "--misclassified", "12", "--correct", "6", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    return ckpt, out


def test_writes_png_grids_json_and_npz(explained):
    _, out = explained
    for name in ("misclassified.png", "correct.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "explain.json").read_text())
    assert info["layer"] == "features.group1"
    assert info["classes"] == ["class0", "class1", "class2", "class3"]
    assert 0 < len(info["misclassified"]) <= 12 and len(info["correct"]) == 6
    for row in info["misclassified"] + info["correct"]:
        assert set(row) >= {"index", "actual", "predicted", "prob", "actual_prob"}
        assert row["actual"] in info["classes"] and 0 <= row["prob"] <= 1
    assert set(info["faithfulness"]) == {"misclassified", "correct"}
    assert {"cam_drop", "random_drop", "cam_wins", "n", "fraction"} <= set(info["faithfulness"]["misclassified"])

    with np.load(out / "cams.npz", allow_pickle=False) as z:
        n = len(info["misclassified"]) + len(info["correct"])
        assert z["indices"].tolist() == [r["index"] for r in info["misclassified"] + info["correct"]]
        assert z["images"].dtype == np.uint8 and z["images"].shape == (n, 32, 32, 3)
        for key in ("cam_pred", "cam_true"):
            assert z[key].dtype == np.float32 and z[key].shape == (n, 32, 32)
            assert z[key].min() >= 0 and z[key].max() <= 1
        m = len(info["misclassified"])
        # correct images: the actual class is the predicted one, so the two maps coincide
        assert np.array_equal(z["cam_pred"][m:], z["cam_true"][m:])
        assert not np.array_equal(z["cam_pred"][:m], z["cam_true"][:m])
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
    # the images in the npz are the test images at those indices
    with np.load(out / "cams.npz") as z:
        expected = run.dataset.test.images[torch.cat([idx, cor])].permute(0, 2, 3, 1).numpy()
        assert np.array_equal(z["images"], expected)


def test_unknown_layer_is_a_one_line_error(explained, capsys):
    from cifarlab.cli import main

    ckpt, out = explained
    rc = main(["explain", "--checkpoint", str(ckpt), "--layer", "features.nope", "--out", str(out / "x"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown layer 'features.nope'" in err and "features.group1" in err and len(err.strip().splitlines()) == 1
