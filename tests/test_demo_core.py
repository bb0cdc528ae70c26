"""``cifarlab.demo.core.DemoModel``: what the demo app computes, tested without a server."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.errors import CifarlabError
from tests.tiny_run import shared_run

CLASSES = ["class0", "class1", "class2", "class3"]
CAPTION = re.compile(r"^(\S+) / (\S+) \((\d\.\d\d)\)$")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def demo(run_dir):
    from cifarlab.demo.core import DemoModel

    return DemoModel.load(run_dir)


@pytest.fixture(scope="module")
def stored(run_dir):
    """The run's stored test logits and targets (predictions.npz), read independently."""
    with np.load(run_dir / "predictions.npz") as z:
        return torch.from_numpy(z["logits"]), torch.from_numpy(z["targets"])


def _expected_captions(stored, actual=None, predicted=None):
    """Captions of all misclassified test images, most confident first, computed from the logits."""
    logits, targets = stored
    probs = logits.softmax(1)
    conf, preds = probs.max(1)
    rows = [
        (-float(conf[i]), i, f"{CLASSES[targets[i]]} / {CLASSES[preds[i]]} ({float(conf[i]):.2f})")
        for i in range(len(targets))
        if preds[i] != targets[i]
        and (actual is None or CLASSES[targets[i]] == actual)
        and (predicted is None or CLASSES[preds[i]] == predicted)
    ]
    return [caption for _, _, caption in sorted(rows)]


def _test_png(demo, path, size=(80, 56)):
    """A test image enlarged (so the demo must resize it) with an alpha channel, saved as PNG."""
    rgb = Image.fromarray(demo.examples[1][0]).resize(size, Image.Resampling.BICUBIC)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(path)
    return path


def _one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------ loading


def test_run_dir_loads_with_layers_info_and_examples(demo, stored):
    assert demo.classes == CLASSES
    assert demo.default_layer == demo.layers[0] == "features.group1"  # the fast net's cam_layer
    names = {n for n, _ in demo.model.named_modules()}
    assert set(demo.layers) <= names and len(set(demo.layers)) == len(demo.layers)
    assert "features.group2" in demo.layers  # 7x7 on a 32x32 input
    assert "features.group3" not in demo.layers  # 3x3: below 4x4
    assert "features.whiten" not in demo.layers  # a bare conv, not a stage output
    logits, targets = stored
    info = demo.info
    assert info["model"] == "fast" and info["params"] == sum(p.numel() for p in demo.model.parameters())
    assert info["accuracy"] == pytest.approx(float((logits.argmax(1) == targets).float().mean()))
    assert info["n_eval"] == demo.metrics["n"] == 128 and info["eval_split"] == "test"
    assert info["epochs"] == 2 and info["best_epoch"] in (1, 2) and 0 <= info["best_acc"] <= 1
    assert info["last_acc"] == pytest.approx(info["accuracy"])
    assert info["data"].startswith("SYNTHETIC") and info["device"] == "cpu" and info["wall_seconds"] > 0
    assert sorted(demo.metrics["per_class"]) == CLASSES and len(demo.metrics["confusion"]) == 4
    # One example per class: the first test image of that class, as (32, 32, 3) uint8.
    from cifarlab.config import config_from_dict
    from cifarlab.context import load_data

    test = load_data(config_from_dict({k: v for k, v in demo.config.items() if v is not None})).test
    assert [label for _, label in demo.examples] == CLASSES
    for c, (img, _) in enumerate(demo.examples):
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        first = int((test.labels == c).nonzero()[0])
        assert np.array_equal(img, test.images[first].permute(1, 2, 0).numpy())


def test_run_dir_reuses_stored_predictions(run_dir, monkeypatch):
    import cifarlab.evaluate as evaluate
    from cifarlab.demo.core import DemoModel

    def boom(run):
        raise AssertionError("predict_split called although predictions.npz matches")

    monkeypatch.setattr(evaluate, "predict_split", boom)
    assert DemoModel.load(run_dir).metrics["n"] == 128


def test_checkpoint_and_safetensors_load_like_the_run_dir(demo, run_dir, tmp_path):
    from cifarlab.demo.core import DemoModel

    from_last = DemoModel.load(run_dir / "checkpoints" / "last.pt")
    from_weights = DemoModel.load(run_dir / "model.safetensors")  # test data from the stored config
    expected = [c for _, c in demo.misclassified(50)]
    for other in (from_last, from_weights):
        assert other.classes == demo.classes and other.layers == demo.layers
        assert [c for _, c in other.misclassified(50)] == expected
        assert other.info["best_acc"] == demo.info["best_acc"]  # safetensors: history from last.pt
        assert set(other.figures()) == {"curves", "per_class", "confusion"}
    # Weights alone, away from their run: the split is predicted anew, no history to plot.
    lone = tmp_path / "lone.safetensors"
    shutil.copy(run_dir / "model.safetensors", lone)
    alone = DemoModel.load(lone)
    assert alone.info["accuracy"] == pytest.approx(demo.info["accuracy"], abs=2 / 128)  # bf16 may flip a close call
    assert alone.info["best_acc"] is None and alone.info["run"] == "lone.safetensors"
    assert set(alone.figures()) == {"per_class", "confusion"}


def test_bad_sources_are_one_line_errors(run_dir, tmp_path):
    from cifarlab.demo.core import DemoModel

    with pytest.raises(CifarlabError) as e:
        DemoModel.load(tmp_path / "nowhere")
    _one_line_error(e, "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CifarlabError) as e:
        DemoModel.load(tmp_path / "empty")
    _one_line_error(e, "not a finished run directory", "demo_data.npz")
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:5000])
    with pytest.raises(CifarlabError) as e:
        DemoModel.load(bad)
    _one_line_error(e, "corrupt or truncated")
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(run_dir / "model.safetensors", export)
    (export / "demo_data.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CifarlabError) as e:
        DemoModel.load(export)
    _one_line_error(e, "demo_data.npz")


# ---------------------------------------------------------------------------- predict


def test_pil_array_and_file_predict_alike_and_agree_with_cifarlab_predict(demo, run_dir, tmp_path):
    from cifarlab.predict import predict_files

    png = _test_png(demo, tmp_path / "big.png")
    by_path = demo.predict(str(png), top_k=4, show_cam=False)[0]
    with Image.open(png) as im:
        assert im.mode == "RGBA" and im.size == (80, 56)
        by_pil = demo.predict(im, top_k=4, show_cam=False)[0]
        by_array = demo.predict(np.asarray(im), top_k=4, show_cam=False)[0]  # (H, W, 4)
    assert by_path == by_pil == by_array
    (cli,) = predict_files([png], run_dir / "checkpoints" / "last.pt", device="cpu", topk=4)
    assert list(by_path)[0] == cli.top[0][0]
    for name, p in cli.top:
        assert by_path[name] == pytest.approx(p, rel=1e-4, abs=1e-5)
    # A test image passed as its own 32x32 array predicts as the test split did.
    scores = demo.predict(demo.examples[2][0], top_k=4, show_cam=False)[0]
    assert abs(sum(scores.values()) - 1) < 1e-4


def test_top_k_is_clipped_and_sorted(demo):
    img = demo.examples[0][0]
    for asked, got in ((0, 1), (-3, 1), (2, 2), (4, 4), (99, 4)):
        scores, _, _ = demo.predict(img, top_k=asked, show_cam=False)
        assert len(scores) == got
        assert list(scores.values()) == sorted(scores.values(), reverse=True)
        assert set(scores) <= set(CLASSES) and 0 < sum(scores.values()) <= 1 + 1e-5


def test_overlays_shapes_opacity_and_second_class(demo):
    from cifarlab.demo.images import upscale

    img = demo.examples[3][0]
    scores, cam, extra = demo.predict(img, show_cam=True)
    assert cam.shape == (224, 224, 3) and cam.dtype == np.uint8 and extra is None
    assert demo.predict(img, show_cam=False)[1:] == (None, None)
    _, plain, _ = demo.predict(img, opacity=0.0)
    assert np.array_equal(plain, upscale(img))  # opacity 0: the image's own pixels, enlarged
    _, heat, _ = demo.predict(img, opacity=1.0)
    assert not np.array_equal(heat, plain)
    other = next(c for c in CLASSES if c != list(scores)[0])
    for layer in demo.layers:
        _, first, second = demo.predict(img, layer=layer, cam_class=other)
        assert first.shape == second.shape == (224, 224, 3) and second.dtype == np.uint8
    # The second map explains the class asked for: asking for the predicted class repeats the first.
    _, first, same = demo.predict(img, cam_class=list(scores)[0])
    assert np.array_equal(first, same)


def test_bad_images_are_one_line_errors(demo, tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(CifarlabError) as e:
        demo.predict(str(text))
    _one_line_error(e, "notes.png", "could not be read")
    full = _test_png(demo, tmp_path / "whole.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CifarlabError) as e:
        demo.predict(cut)
    _one_line_error(e, "cut.png")
    with Image.open(cut) as im, pytest.raises(CifarlabError) as e:  # opens lazily; fails on reading pixels
        demo.predict(im)
    _one_line_error(e, "could not be read")
    for arr in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(CifarlabError) as e:
            demo.predict(arr)
        _one_line_error(e, "uint8")
    with pytest.raises(CifarlabError) as e:
        demo.predict(tmp_path / "missing.png")
    _one_line_error(e, "not found")
    with pytest.raises(CifarlabError):
        demo.predict(None)
    import cifarlab.demo.core as core

    monkeypatch.setattr(core, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(CifarlabError) as e:
        demo.predict(full)
    _one_line_error(e, "whole.png", "MB")


def test_unknown_layer_or_class_is_a_one_line_error(demo):
    img = demo.examples[0][0]
    with pytest.raises(CifarlabError) as e:
        demo.predict(img, layer="head.fc")
    _one_line_error(e, "head.fc", demo.default_layer)
    with pytest.raises(CifarlabError) as e:
        demo.predict(img, cam_class="zebra")
    _one_line_error(e, "zebra", "class0")
    for kw in ({"actual": "zebra"}, {"predicted": "zebra"}, {"layer": "nope", "show_cam": True}):
        with pytest.raises(CifarlabError):
            demo.misclassified(5, **kw)


def test_concurrent_calls_give_the_same_answers(demo):
    imgs = [img for img, _ in demo.examples] * 2
    alone = [demo.predict(img, top_k=4) for img in imgs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda img: demo.predict(img, top_k=4), imgs))
    for (s1, c1, _), (s2, c2, _) in zip(alone, together):
        assert s1 == s2 and np.array_equal(c1, c2)


# ---------------------------------------------------------------------- misclassified


def test_misclassified_captions_filters_and_count(demo, stored):
    everything = _expected_captions(stored)
    assert everything, "the tiny run must misclassify something for this test to mean anything"
    got = demo.misclassified(50)
    assert [c for _, c in got] == everything[:50]
    for img, caption in got:
        actual, predicted, p = CAPTION.match(caption).groups()
        assert actual != predicted and 0 < float(p) <= 1
        assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    assert len(demo.misclassified(3)) == min(3, len(everything))
    assert len(demo.misclassified(0)) == 1  # count is clipped to 1..50
    assert [c for _, c in demo.misclassified(10, actual="any", predicted=None)] == everything[:10]
    for cls in CLASSES:
        assert [c for _, c in demo.misclassified(50, actual=cls)] == _expected_captions(stored, actual=cls)
        assert [c for _, c in demo.misclassified(50, predicted=cls)] == _expected_captions(stored, predicted=cls)
    a, p, _ = CAPTION.match(everything[0]).groups()
    both = demo.misclassified(50, actual=a, predicted=p)
    assert both and [c for _, c in both] == _expected_captions(stored, actual=a, predicted=p)
    assert demo.misclassified(5, actual=a, predicted=a) == []  # right answers are never "misclassified"


def test_misclassified_with_cam_shows_both_classes_side_by_side(demo):
    plain = demo.misclassified(4)
    cams = demo.misclassified(4, show_cam=True, layer=demo.layers[-1], opacity=0.7)
    assert [c for _, c in cams] == [c for _, c in plain]
    for img, _ in cams:
        assert img.shape == (224, 448, 3) and img.dtype == np.uint8
    # Opacity 0 shows the image itself in both halves.
    for (img, _), (pic, _) in zip(demo.misclassified(4, show_cam=True, opacity=0.0), plain):
        assert np.array_equal(img[:, :224], pic) and np.array_equal(img[:, 224:], pic)


def test_cam_method_changes_the_maps_not_the_answers(demo):
    from cifarlab.config import CAM_METHODS

    img = demo.examples[0][0]
    scores, grad, _ = demo.predict(img)  # the default: Grad-CAM
    assert demo.predict(img, cam="gradcam")[1].tobytes() == grad.tobytes()
    for method in CAM_METHODS[1:]:
        other_scores, other, _ = demo.predict(img, cam=method, opacity=1.0)
        assert other_scores == scores and other.shape == grad.shape
    assert not np.array_equal(demo.predict(img, cam="layercam", opacity=1.0)[1], demo.predict(img, opacity=1.0)[1])
    # the misclassified pool's maps are cached per layer and method
    default = demo.misclassified(2, show_cam=True, opacity=1.0)
    eigen = demo.misclassified(2, show_cam=True, opacity=1.0, cam="eigencam")
    assert [c for _, c in default] == [c for _, c in eigen]
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(default, eigen))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(eigen, demo.misclassified(2, show_cam=True, opacity=1.0, cam="eigencam")))
    with pytest.raises(CifarlabError) as e:
        demo.predict(img, cam="gradcam+")
    _one_line_error(e, "gradcam+", "layercam")


def test_figures_are_pngs(demo):
    figs = demo.figures()
    assert set(figs) == {"curves", "per_class", "confusion"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000 for png in figs.values())


# ------------------------------------------------------------------------ export data


def test_save_demo_data_round_trips_without_a_dataset(demo, run_dir, tmp_path, monkeypatch):
    import cifarlab.context as context
    from cifarlab.demo.core import DEMO_DATA_FILE, DemoModel

    folder = tmp_path / "space"
    folder.mkdir()
    shutil.copy(run_dir / "model.safetensors", folder)
    written = demo.save_demo_data(folder)
    assert written == folder / DEMO_DATA_FILE and written.is_file()

    def no_data(cfg, progress=False):
        raise AssertionError("an exported folder must not load a dataset")

    monkeypatch.setattr(context, "load_data", no_data)
    back = DemoModel.load(folder)
    assert back.classes == demo.classes and back.layers == demo.layers
    assert back.info == demo.info and back.metrics == demo.metrics
    assert back.figures() == demo.figures()
    assert [label for _, label in back.examples] == [label for _, label in demo.examples]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(back.examples, demo.examples))
    for img, _ in demo.examples:
        s1, c1, _ = demo.predict(img, top_k=4)
        s2, c2, _ = back.predict(img, top_k=4)
        assert s1 == s2 and np.array_equal(c1, c2)
    for kw in ({}, {"actual": "class1"}, {"predicted": "class2"}):
        assert [c for _, c in back.misclassified(50, **kw)] == [c for _, c in demo.misclassified(50, **kw)]
    cams = back.misclassified(3, show_cam=True)
    assert [img.shape for img, _ in cams] == [(224, 448, 3)] * len(cams)
