"""``cifarlab demo``'s web app.

The callbacks and the page's wiring are tested without a server against a stub model;
the CLI's one-line errors in-process; then the real ``cifarlab demo`` process serves a
tiny synthetic run, is queried through gradio_client (top-1 must equal ``cifarlab
predict`` on the same file) and stops cleanly on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cifarlab.demo.core import MAX_UPLOAD_BYTES
from cifarlab.errors import CifarlabError
from tests.tiny_run import shared_run

CAPTION = re.compile(r"^(?P<actual>\S+) / (?P<predicted>\S+) \((?P<p>[01]\.\d\d)\)$")


class StubModel:
    """The DemoModel interface with canned answers; records every call."""

    classes = ["cat", "dog", "ship", "frog"]
    layers = ["layer2", "layer1"]
    default_layer = "layer2"
    info = {
        "model": "fast", "params": 1_234_567, "epochs": 2, "best_acc": 0.5, "best_epoch": 2, "last_acc": 0.4375,
        "wall_seconds": 75.4, "eval_split": "test", "data": "SYNTHETIC data (4 classes)", "precision": "fp32",
        "device": "cpu",
    }

    def __init__(self):
        self.calls: list[tuple] = []
        self.cams: list[str] = []  # the CAM method of each call
        self.examples = [(np.full((32, 32, 3), 40 * i, np.uint8), c) for i, c in enumerate(self.classes)]

    def predict(self, image, top_k=3, show_cam=True, layer=None, opacity=0.5, cam_class=None, cam="gradcam"):
        self.calls.append(("predict", image, top_k, show_cam, layer, opacity, cam_class))
        self.cams.append(cam)
        if layer not in (None, *self.layers):
            raise CifarlabError(f"unknown layer {layer!r}")
        scores = dict(list({"cat": 0.6, "dog": 0.3, "ship": 0.07, "frog": 0.03}.items())[:top_k])
        overlay = np.zeros((224, 224, 3), np.uint8) if show_cam else None
        return scores, overlay, (np.ones((224, 224, 3), np.uint8) if cam_class else None)

    def misclassified(self, count=10, show_cam=False, actual=None, predicted=None, layer=None, opacity=0.5, cam="gradcam"):
        self.calls.append(("misclassified", count, show_cam, actual, predicted))
        self.cams.append(cam)
        if actual == "frog":
            return []
        width = 448 if show_cam else 224
        return [(np.zeros((224, width, 3), np.uint8), f"cat / dog ({0.9 - i / 100:.2f})") for i in range(count)]

    def figures(self):
        buf = io.BytesIO()
        Image.new("RGB", (60, 40), "red").save(buf, "PNG")
        return {"curves": buf.getvalue(), "confusion": buf.getvalue()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ callbacks (no server)


def _png_shape(path) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).shape


def test_image_files_are_written_once_per_content(tmp_path):
    # Gradio rewrites an array's cache file on every return, racing a browser that is
    # downloading it; the handlers hand it files written once instead.
    from cifarlab.demo.handlers import ImageFiles

    files = ImageFiles()
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    first = files(a)
    mtime = os.stat(first).st_mtime_ns
    assert files(a.copy()) == first and os.stat(first).st_mtime_ns == mtime
    assert files(a + 1) != first and files(None) is None
    from PIL import Image

    with Image.open(first) as im:
        assert np.array_equal(np.asarray(im), a)


def test_predict_callback_passes_the_uploaded_file_and_clears_on_no_image():
    from cifarlab.demo.handlers import Handlers

    model = StubModel()
    h = Handlers(model)
    scores, overlay = h.predict({"path": "/tmp/up/cat.png", "orig_name": "cat.png"}, 2.0, True, "layer1", 0.25)
    assert scores == {"cat": 0.6, "dog": 0.3} and _png_shape(overlay) == (224, 224, 3)
    # the file itself goes to the model (decoded there as `cifarlab predict` decodes), ints and floats cast
    assert model.calls[-1] == ("predict", "/tmp/up/cat.png", 2, True, "layer1", 0.25, None)
    assert h.predict({"path": "/x.png"}, 3, False, "layer2", 0.5)[1] is None
    n = len(model.calls)
    assert h.predict(None, 3, True, "layer2", 0.5) == (None, None)
    assert len(model.calls) == n


def test_model_errors_become_in_app_messages():
    import gradio as gr

    from cifarlab.demo.handlers import Handlers

    h = Handlers(StubModel())
    with pytest.raises(gr.Error, match="unknown layer 'nope'"):
        h.predict({"path": "/x.png"}, 3, True, "nope", 0.5)
    with pytest.raises(gr.Error, match="upload the image again"):
        h.predict({"path": None}, 3, True, "layer2", 0.5)
    # an error leaves the handlers usable
    assert h.predict({"path": "/x.png"}, 1, True, "layer2", 0.5)[0] == {"cat": 0.6}


def test_class_cam_callback_only_for_a_picked_class():
    from cifarlab.demo.handlers import NO_CLASS, Handlers

    model = StubModel()
    h = Handlers(model)
    assert h.class_cam({"path": "/x.png"}, NO_CLASS, True, "layer2", 0.5) is None
    assert h.class_cam({"path": "/x.png"}, "dog", False, "layer2", 0.5) is None
    assert not model.calls
    overlay = h.class_cam({"path": "/x.png"}, "dog", True, "layer1", 0.7)
    assert _png_shape(overlay) == (224, 224, 3)
    assert model.calls == [("predict", "/x.png", 1, True, "layer1", 0.7, "dog")]
    h.class_cam({"path": "/x.png"}, "dog", True, "layer1", 0.7, "layercam")
    h.predict({"path": "/x.png"}, 1, True, "layer1", 0.7, "eigencam")
    h.misclassified(2, True, "cat", "any", "scorecam")
    assert model.cams == ["gradcam", "layercam", "eigencam", "scorecam"]  # the method reaches the model; default Grad-CAM


def test_misclassified_callback_maps_any_to_no_filter():
    from cifarlab.demo.handlers import ANY, Handlers

    model = StubModel()
    h = Handlers(model)
    items = h.misclassified(4.0, False, ANY, "dog")
    assert len(items) == 4 and all(CAPTION.match(c) for _, c in items)
    assert model.calls[-1] == ("misclassified", 4, False, None, "dog")
    assert _png_shape(h.misclassified(3, True, "cat", ANY)[0][0]) == (224, 448, 3)
    assert h.misclassified(3, False, "frog", ANY) == []  # an empty filter result is a message, not an error


def test_run_tab_text_and_figures():
    from cifarlab.demo.handlers import Handlers, headline, info_markdown

    table = info_markdown(StubModel.info)
    for row in ("| Model | fast |", "| Parameters | 1.23M |", "| Best accuracy | 50.00% |", "| Last accuracy | 43.75% |",
                "| Training time | 1m 15s |", "| Data | SYNTHETIC data (4 classes) |"):
        assert row in table.splitlines()
    assert info_markdown({"model": "x"}).splitlines()[2:] == ["| Model | x |"]  # missing keys are left out
    assert "SYNTHETIC" in headline(StubModel.info) and "43.75%" in headline(StubModel.info)
    figs = Handlers(StubModel()).figures()
    assert sorted(figs) == ["confusion", "curves"] and figs["curves"].size == (60, 40)


def test_confusion_cells_pick_a_filter():
    from cifarlab.demo.handlers import confusion_cell, confusion_table

    classes = ["cat", "dog", "ship"]
    assert confusion_table(classes, [[5, 1, 0], [2, 7, 0], [0, 0, 9]]) == [
        ["cat", 5, 1, 0], ["dog", 2, 7, 0], ["ship", 0, 0, 9],
    ]
    # column 0 holds the class names: cell (row, col) is actual=classes[row], predicted=classes[col - 1]
    assert confusion_cell(classes, [1, 1]) == ("dog", "cat")
    assert confusion_cell(classes, (0, 3)) == ("cat", "ship")
    for index in ([1, 2], [0, 0], [3, 1], [0, 4], None, ["a", 1]):  # diagonal, name column, outside, junk
        assert confusion_cell(classes, index) is None


def test_page_wiring():
    from cifarlab.demo.app import build_app

    app = build_app(StubModel())
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
    config = app.get_config_file()
    by_name = {fn.api_name: fn for fn in app.fns.values()}
    labels = {b._id: getattr(b, "label", None) for b in app.blocks.values()}
    assert [labels[c._id] for c in by_name["predict"].inputs] == [
        "Image (any size and format)", "Top-k classes", "CAM",
        "Layer to explain", "Overlay opacity", "CAM method",
    ]
    assert [type(c).__name__ for c in by_name["predict"].outputs] == ["Label", "Image"]
    assert [labels[c._id] for c in by_name["misclassified"].inputs] == [
        "How many", "CAM (predicted | actual class)", "Actual class", "Predicted class", "CAM method",
    ]
    assert [type(c).__name__ for c in by_name["misclassified"].outputs] == ["Gallery"]
    tabs = [b.label for b in app.blocks.values() if type(b).__name__ == "Tab"]
    assert tabs == ["Classify", "Misclassified", "Run"]
    sliders = {b.label: (b.minimum, b.maximum, b.value) for b in app.blocks.values() if type(b).__name__ == "Slider"}
    assert sliders["Top-k classes"] == (1, 4, 3) and sliders["How many"] == (1, 50, 10)
    assert sliders["Overlay opacity"] == (0.0, 1.0, 0.5)
    layer = next(b for b in app.blocks.values() if getattr(b, "label", None) == "Layer to explain")
    assert [c[0] for c in layer.choices] == ["layer2", "layer1"] and layer.value == "layer2"
    assert config["title"] == "cifarlab demo: fast"
    # the examples, one per class, reach the page as lossless PNGs with the test images' pixels
    samples = next(b for b in app.blocks.values() if type(b).__name__ == "Dataset").samples
    assert len(samples) == len(StubModel.classes)
    for [sample], (pixels, _) in zip(samples, StubModel().examples):
        with Image.open(sample["path"]) as im:
            assert im.format == "PNG" and np.array_equal(np.asarray(im), pixels)
    # the confusion table (when the model has metrics) drives the misclassified filters, privately
    model = StubModel()
    model.metrics = {"confusion": [[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0], [1, 0, 0, 3]]}
    app = build_app(model)
    picks = [fn for fn in app.fns.values() if [type(c).__name__ for c in fn.outputs] == ["Dropdown", "Dropdown", "Tabs"]]
    assert len(picks) == 1 and picks[0].api_visibility == "private"
    assert not any(fn.api_name == "predict" for fn in picks)


def test_port_in_use_is_one_line(tmp_path):
    from cifarlab.demo.app import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CifarlabError, match=rf"^port {port} on 127.0.0.1 is in use; pass --port$"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # closed again: free
    with pytest.raises(CifarlabError, match="1..65535"):
        check_port("127.0.0.1", 70000)


# ------------------------------------------------------------------------ CLI errors


def _main(capsys, *args):
    from cifarlab.cli import main

    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def test_cli_port_in_use_and_bad_source(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = _main(capsys, "demo", str(tmp_path), "--port", str(port))
    assert code == 2 and err == f"cifarlab: error: port {port} on 127.0.0.1 is in use; pass --port\n"
    code, err = _main(capsys, "demo", str(tmp_path / "nothing-here"), "--port", str(free_port()))
    assert code == 2 and err.startswith("cifarlab: error: ") and err.count("\n") == 1
    (tmp_path / "empty_run").mkdir()
    code, err = _main(capsys, "demo", str(tmp_path / "empty_run"), "--port", str(free_port()))
    assert code == 2 and "checkpoint" in err and err.count("\n") == 1


# ------------------------------------------------------------- the real server (CLI)


class Server:
    """A ``cifarlab demo`` process: its URL and what it printed so far."""

    def __init__(self, proc: subprocess.Popen, url: str, stderr: list[str]):
        self.proc, self.url, self.stderr = proc, url, stderr

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)


def _pump(stream, sink) -> None:
    for line in stream:
        sink(line)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    cmd = [sys.executable, "-m", "cifarlab", "demo", str(run_dir), "--port", str(free_port()), "--device", "cpu"]
    # Started with SIGINT ignored, as a script's background job is: the Ctrl-C test then
    # shows the demo installs its own handler (and does not depend on how pytest was started).
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    out: queue.Queue[str] = queue.Queue()
    err: list[str] = []
    threading.Thread(target=_pump, args=(proc.stdout, out.put), daemon=True).start()
    threading.Thread(target=_pump, args=(proc.stderr, err.append), daemon=True).start()
    try:
        url = None
        while url is None:
            try:
                line = out.get(timeout=300)  # a hang fails the test instead of blocking the suite
            except queue.Empty:
                pytest.fail("cifarlab demo printed no URL: " + "".join(err)[-2000:])
            m = re.match(r"cifarlab demo: serving (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)$", line.strip())
            url = m.group(1) if m else None
            if proc.poll() is not None and out.empty():
                pytest.fail("cifarlab demo exited: " + "".join(err)[-2000:])
        yield Server(proc, url, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _image_files(folder: Path) -> list[Path]:
    """Files of odd sizes, modes and formats, as a user would upload them."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "wide.jpg": Image.fromarray(rng.integers(0, 256, (77, 200, 3), dtype=np.uint8)),
        "gray.png": Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8), "L"),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (45, 45, 4), dtype=np.uint8), "RGBA"),
    }
    for name, im in images.items():
        im.save(folder / name)
    return [folder / name for name in images]


def test_server_predict_agrees_with_cifarlab_predict(server, run_dir, tmp_path):
    from gradio_client import handle_file

    from cifarlab.predict import predict_files

    files = _image_files(tmp_path)
    expected = predict_files(files, run_dir / "checkpoints" / "last.pt", device="cpu", topk=3)
    client = server.client()
    for path, want in zip(files, expected):
        label, overlay = client.predict(handle_file(str(path)), 3, True, "", 0.5, api_name="/predict")
        got = [(c["label"], c["confidence"]) for c in label["confidences"]]
        assert label["label"] == want.top[0][0], path.name
        assert [c for c, _ in got] == [c for c, _ in want.top]
        assert np.allclose([p for _, p in got], [p for _, p in want.top], atol=1e-6)
        with Image.open(overlay) as im:
            assert im.mode == "RGB" and im.size[0] == im.size[1] >= 32
    # top_k is clipped to the number of classes; no CAM -> no overlay
    label, overlay = client.predict(handle_file(str(files[0])), 10, False, "", 0.5, api_name="/predict")
    assert len(label["confidences"]) == 4 and overlay is None


def test_server_misclassified_gallery(server):
    client = server.client()
    items = client.predict(5, False, "any", "any", api_name="/misclassified")
    assert len(items) == 5
    probs = []
    for item in items:
        m = CAPTION.match(item["caption"])
        assert m and m["actual"] != m["predicted"], item["caption"]
        probs.append(float(m["p"]))
        with Image.open(item["image"]) as im:
            assert im.size[0] == im.size[1] >= 32
    assert probs == sorted(probs, reverse=True)  # most confident mistakes first
    with_cam = client.predict(2, True, "any", "any", api_name="/misclassified")
    assert [i["caption"] for i in with_cam] == [i["caption"] for i in items[:2]]
    with Image.open(with_cam[0]["image"]) as im:  # predicted-class and actual-class CAM side by side
        assert im.size[0] == 2 * im.size[1]
    actual = CAPTION.match(items[0]["caption"])["actual"]
    filtered = client.predict(50, False, actual, "any", api_name="/misclassified")
    assert filtered and all(CAPTION.match(i["caption"])["actual"] == actual for i in filtered)


def test_server_bad_uploads_are_messages(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = server.client()
    (tmp_path / "notes.png").write_text("not an image\n")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    for name in ("notes.png", "truncated.png"):
        with pytest.raises(AppError) as exc:
            client.predict(handle_file(str(tmp_path / name)), 3, True, "", 0.5, api_name="/predict")
        message = str(exc.value)
        print(name, message)
        assert message and "\n" not in message.strip() and "Traceback" not in message, message
    with pytest.raises(AppError, match="unknown layer"):
        client.predict(handle_file(str(good)), 3, True, "no.such.layer", 0.5, api_name="/predict")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client reads the limit from the app
        client.predict(handle_file(str(big)), 3, True, "", 0.5, api_name="/predict")
    # and the server's upload route refuses it from any client
    with big.open("rb") as f:
        reply = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=60)
    print(reply.status_code, reply.text[:300])
    assert reply.status_code == 413, reply.text
    # the server is still up and answers
    assert client.predict(handle_file(str(good)), 1, False, "", 0.5, api_name="/predict")[0]["label"]


def test_ctrl_c_stops_the_server_cleanly(server):
    """Runs last in this module: SIGINT (Ctrl-C) ends the process with status 0, no traceback."""
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0
    err = "".join(server.stderr)
    assert "Traceback" not in err and "cifarlab demo: stopped" in err, err
