"""``cifarlab predict`` on image files of odd sizes and modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_run import shared_run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shared_run(tmp_path_factory) / "checkpoints" / "last.pt"


def _odd_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}

    def save(name, im, **kw):
        paths[name] = folder / name
        im.save(paths[name], **kw)

    save("wide_200x77.png", Image.fromarray(rng.integers(0, 256, (77, 200, 3), dtype=np.uint8)))
    save("dot_1x1.png", Image.fromarray(np.array([[[200, 10, 30]]], dtype=np.uint8)))
    save("gray_L.png", Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8), "L"))
    save("alpha_RGBA.png", Image.fromarray(rng.integers(0, 256, (45, 45, 4), dtype=np.uint8), "RGBA"))
    save("palette_P.png", Image.fromarray(rng.integers(0, 256, (33, 60, 3), dtype=np.uint8)).convert("P"))
    save("cmyk.jpg", Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).convert("CMYK"), quality=90)
    save("gray.jpg", Image.fromarray(rng.integers(0, 256, (31, 70), dtype=np.uint8), "L"), quality=90)
    return paths


def test_predicts_top3_for_odd_sizes_and_modes(checkpoint, tmp_path):
    from cifarlab.predict import predict_files

    paths = _odd_images(tmp_path / "img")
    preds = predict_files(list(paths.values()), checkpoint, device="cpu")
    assert [p.path for p in preds] == [str(p) for p in paths.values()]
    classes = {"class0", "class1", "class2", "class3"}
    for p in preds:
        assert len(p.top) == 3
        names, probs = zip(*p.top)
        assert set(names) <= classes and len(set(names)) == 3
        assert list(probs) == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_a_test_image_file_predicts_like_the_test_split(checkpoint, tmp_path):
    """Same decode/resize/normalise path as the dataset: a saved test image gets its logits."""
    from cifarlab.evaluate import load_for_inference, predict_split
    from cifarlab.predict import predict_files

    run = load_for_inference(str(checkpoint), {"device": "cpu"})
    probs = predict_split(run).logits.softmax(1)
    files = []
    for i in (0, 5, 17):
        f = tmp_path / f"test{i}.png"
        Image.fromarray(run.dataset.test.images[i].permute(1, 2, 0).numpy()).save(f)
        files.append(f)
    preds = predict_files(files, checkpoint, device="cpu", topk=4)
    for i, p in zip((0, 5, 17), preds):
        got = torch.tensor([q for _, q in sorted(p.top, key=lambda t: t[0])])
        torch.testing.assert_close(got, probs[i], rtol=1e-4, atol=1e-5)


def test_cli_explain_writes_cam_overlays(checkpoint, tmp_path, capsys):
    from cifarlab.cli import main

    paths = _odd_images(tmp_path / "img")
    picked = [paths["wide_200x77.png"], paths["cmyk.jpg"], paths["dot_1x1.png"]]
    rc = main(["predict", *map(str, picked), "--checkpoint", str(checkpoint), "--explain", "--device", "cpu", "--json"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(len(d["top"]) == 3 for d in lines)
    for src, d in zip(picked, lines):
        cam = src.with_name(f"{src.stem}.cam.png")  # next to the image by default
        assert d["cam"] == str(cam)
        with Image.open(cam) as im:
            assert im.format == "PNG" and im.size[0] > 100
    out = tmp_path / "cams"
    assert main(["predict", str(picked[0]), "--checkpoint", str(checkpoint), "--explain", "--out", str(out)]) == 0
    assert (out / "wide_200x77.cam.png").is_file()


def test_explain_with_another_cam_method(checkpoint, tmp_path, capsys):
    from cifarlab.cli import main
    from cifarlab.predict import predict_files

    src = _odd_images(tmp_path / "img")["wide_200x77.png"]
    default, = predict_files([src], checkpoint, device="cpu", explain=True, out=tmp_path / "a")
    other, = predict_files([src], checkpoint, device="cpu", explain=True, out=tmp_path / "b", cam="gradcam++")
    assert default.extra["method"] == "gradcam" and other.extra["method"] == "gradcam++"
    assert default.top == other.top  # the method changes the picture, not the prediction
    with Image.open(default.cam_path) as a, Image.open(other.cam_path) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))
    out = tmp_path / "c"
    assert main(["predict", str(src), "--checkpoint", str(checkpoint), "--explain", "--cam", "eigencam", "--out", str(out)]) == 0
    assert (out / "wide_200x77.cam.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", str(src), "--checkpoint", str(checkpoint), "--explain", "--cam", "gradcam+"])
    assert "invalid choice: 'gradcam+'" in capsys.readouterr().err


def test_unreadable_or_missing_files_are_one_line_errors(checkpoint, tmp_path, capsys):
    from cifarlab.cli import main

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", str(bad), "--checkpoint", str(checkpoint)]) == 2
    assert "could not be read as images" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint)]) == 2
    assert "image not found" in capsys.readouterr().err
