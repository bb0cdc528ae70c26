"""``cifarlab demo --export``: the Hugging Face Space folder.

A tiny synthetic run is exported once; the tests check the folder's files, the README's
front matter and model card, the wheel requirements.txt names, that the wheel build
leaves the checkout as it was, and finally run the folder's own ``app.py`` from a
temporary directory with cifarlab imported from the exported wheel (not the checkout),
querying it through gradio_client: its answers must equal ``DemoModel.load(run_dir)``'s.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.errors import CifarlabError
from tests.tiny_run import shared_run

WHEEL = re.compile(r"^\./(cifarlab-[\w.]+-py3-none-any\.whl)$")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)  # shared: read only here


@pytest.fixture(scope="module")
def reference(run_dir):
    """The demo model of the run itself: what the exported app must answer."""
    from cifarlab.demo.core import DemoModel

    return DemoModel.load(run_dir)


@pytest.fixture(scope="module")
def space(run_dir, tmp_path_factory) -> Path:
    from cifarlab.demo.export import export_space

    out = tmp_path_factory.mktemp("export") / "space"
    assert export_space(run_dir, out) == out
    return out


def front_matter(readme: str) -> dict:
    import yaml

    assert readme.startswith("---\n")
    block = readme.split("---\n", 2)[1]
    return yaml.safe_load(block)


# ------------------------------------------------------------------------- the folder


def test_export_writes_every_file_of_the_space(space, reference, run_dir):
    from cifarlab.checkpoint import read_checkpoint

    names = {p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()}
    for name in ("app.py", "requirements.txt", "README.md", "model.safetensors", "demo_data.npz", ".gitattributes",
                 ".cifarlab-export", "figures/per_class.png", "figures/confusion.png", "figures/curves.png"):
        assert name in names
    # one example per class, the pixels the demo offers
    assert len(reference.examples) == len(reference.classes) == 4
    for image, name in reference.examples:
        png = np.asarray(Image.open(space / "examples" / f"{name}.png"))
        assert png.shape == (32, 32, 3)
        assert np.array_equal(png, image)
    # the weights are the run's, with their description as metadata
    exported = read_checkpoint(space / "model.safetensors")
    last = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert exported["classes"] == reference.classes
    assert exported["model"] == last["model"] and exported["config"] == last["config"]
    assert exported["mean"] == pytest.approx(last["mean"]) and exported["epoch"] == last["epoch"]
    assert exported["state_dict"].keys() == last["state_dict"].keys()
    assert all(torch.equal(exported["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    assert "*.whl filter=lfs" in (space / ".gitattributes").read_text()


def test_readme_has_the_spaces_front_matter_and_a_model_card(space, reference):
    import gradio

    readme = (space / "README.md").read_text(encoding="utf-8")
    meta = front_matter(readme)
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == gradio.__version__
    assert meta["app_file"] == "app.py"
    assert meta["pinned"] is False
    assert meta["title"] and meta["emoji"] and meta["colorFrom"] and meta["colorTo"]
    assert meta["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    body = readme.split("---\n", 2)[2]
    assert "WARNING: SYNTHETIC DATA" in body  # loud, near the top
    assert body.index("SYNTHETIC DATA") < body.index("## Model")
    assert "JPEG" not in body
    acc = reference.info["accuracy"]
    assert f"**{acc:.2%}** on the {reference.info['eval_split']} split" in body
    counts = [sum(row) for row in reference.metrics["confusion"]]
    for (name, class_acc), n in zip(reference.metrics["per_class"].items(), counts):
        assert f"| {name} | {class_acc:.1%} | {n} |" in body
    for fig in ("curves", "per_class", "confusion"):
        assert f"(figures/{fig}.png)" in body
    assert "api_name=\"/predict\"" in body and "api_name=\"/misclassified\"" in body


def test_requirements_pin_what_the_wheel_in_the_folder_needs(space):
    import gradio
    import numpy
    import safetensors

    lines = [ln.strip() for ln in (space / "requirements.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    # No line for cifarlab itself: Spaces installs requirements.txt before the folder's files
    # are there, so app.py imports it from the wheel instead.
    assert not any(WHEEL.match(ln) or ln.startswith("cifarlab") for ln in lines)
    wheels = [w.name for w in space.glob("*.whl")]
    assert len(wheels) == 1 and WHEEL.match(f"./{wheels[0]}")
    assert f"gradio=={gradio.__version__}" in lines
    assert f"torch=={torch.__version__.split('+')[0]}" in lines
    assert f"numpy=={numpy.__version__}" in lines and f"safetensors=={safetensors.__version__}" in lines
    with zipfile.ZipFile(space / wheels[0]) as zf:
        files = set(zf.namelist())
        assert {"cifarlab/demo/core.py", "cifarlab/demo/app.py", "cifarlab/demo/export.py", "cifarlab/cli.py"} <= files
        assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
        info = next(f for f in files if f.endswith(".dist-info/METADATA"))
        assert "Name: cifarlab" in zf.read(info).decode()


def test_jpeg_copy_and_real_data_get_their_own_card(space, reference):
    """The card's data section and limitations follow the run's data path, with no local path in it."""
    from cifarlab.demo.export import _template_env, card_context, data_facts

    ckpt = {"dataset": {"name": "imagefolder", "root": "/home/me/shared/datasets/cifar10-jpeg", "synthetic": False},
            "config": {"dataset": "imagefolder", "preset": "fast", "epochs": 10}, "model": {"name": "fast"},
            "classes": reference.classes, "mean": [0.5] * 3, "std": [0.25] * 3, "epoch": 10}
    facts = data_facts(ckpt, None)
    assert facts["jpeg"] and not facts["synthetic"] and facts["folder"] == "cifar10-jpeg"
    stub = SimpleNamespace(info=reference.info, metrics=reference.metrics, default_layer=reference.default_layer)
    card = card_context(stub, ckpt, None, wheel="cifarlab-0.1.0-py3-none-any.whl",
                        examples=[{"file": "examples/a.png", "name": "a"}], figures=[])
    readme = _template_env().get_template("space_readme.md.j2").render(**card)
    assert "accuracy measured on the jpeg q75 copy of cifar-10" in readme.lower()
    assert "SYNTHETIC" not in readme and "/home/me" not in readme
    assert front_matter(readme)["title"].endswith("cifar10-jpeg")
    other = data_facts({**ckpt, "dataset": {"name": "cifar10", "root": "/data/cifar", "synthetic": False}}, None)
    assert not other["jpeg"] and not other["synthetic"] and other["folder"] == "cifar"


# ------------------------------------------------------------------------- overwriting


def test_refuses_a_folder_that_is_not_an_export(tmp_path, run_dir):
    from cifarlab.demo.export import export_space

    taken = tmp_path / "mine"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(CifarlabError, match="is not empty and is not a previous export") as err:
        export_space(run_dir, taken)
    assert "\n" not in str(err.value)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(CifarlabError, match="not a folder"):
        export_space(run_dir, afile)


def test_exporting_an_export_replaces_a_previous_export(space, tmp_path):
    """An exported folder is itself a source, and a previous export may be overwritten (stale files go)."""
    from cifarlab.demo.export import export_space

    target = tmp_path / "again"
    shutil.copytree(space, target)
    (target / "stale.txt").write_text("from an older export")
    export_space(space, target)
    assert not (target / "stale.txt").exists()
    assert not list(tmp_path.glob(".again.*"))  # no staging or old copy left beside it
    assert (target / "demo_data.npz").is_file() and (target / "README.md").is_file()
    old, new = _class_rows(space / "README.md"), _class_rows(target / "README.md")
    assert new == old and len(new) == 4


def _class_rows(readme: Path) -> list[str]:
    """The per-class accuracy table's rows of a model card."""
    return [ln for ln in readme.read_text(encoding="utf-8").splitlines() if re.match(r"^\| class\d ", ln)]


# ------------------------------------------------------------------------- the wheel


def _tree_state(root: Path) -> dict[str, float]:
    """Top-level entries of the checkout and src/, and every file under src/*.egg-info, with mtimes."""
    state = {p.relative_to(root).as_posix(): 0.0 for p in (*root.iterdir(), *(root / "src").iterdir())}
    for info in (root / "src").glob("*.egg-info"):
        state.update({p.relative_to(root).as_posix(): p.stat().st_mtime for p in info.rglob("*")})
    return state


def test_wheel_build_writes_nothing_into_the_checkout(tmp_path):
    from cifarlab.demo.export import build_wheel, source_tree

    root = source_tree()
    if root is None:
        pytest.skip("cifarlab is not installed from a checkout")
    before = _tree_state(root)
    wheel = build_wheel(tmp_path)
    assert wheel.parent == tmp_path and wheel.name.startswith("cifarlab-")
    assert _tree_state(root) == before  # no build/, dist/ or rewritten egg-info


def test_a_non_editable_install_is_repacked_into_the_same_wheel(space, tmp_path):
    """Installed from the wheel (pip install --target), cifarlab has no source tree: the
    export repacks the installed files, and the result holds the same files as the wheel."""
    wheel = next(space.glob("*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys; from pathlib import Path; import cifarlab; from cifarlab.demo.export import source_tree, "
            "build_wheel; assert source_tree() is None, cifarlab.__file__; print(build_wheel(Path(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    repacked = Path(proc.stdout.strip().splitlines()[-1])
    assert repacked.name == wheel.name and repacked.parent == out
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(repacked) as b:
        names = [n for n in a.namelist() if not n.endswith("/RECORD")]
        assert sorted(names) == sorted(n for n in b.namelist() if not n.endswith("/RECORD"))
        assert all(a.read(n) == b.read(n) for n in names)
        record = b.read(next(n for n in b.namelist() if n.endswith("/RECORD"))).decode()
        assert len(record.splitlines()) == len(names) + 1 and "sha256=" in record


# ------------------------------------------------------------------------- the app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_served(proc: subprocess.Popen, url: str, log: Path, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve {url}:\n{log.read_text()[-3000:]}")


def _gallery_path(item) -> str:
    image = item["image"]
    return image["path"] if isinstance(image, dict) else image


def test_exported_app_runs_from_its_folder_and_answers_like_the_run(space, reference, tmp_path):
    from gradio_client import Client, handle_file

    # app.py imports cifarlab from the wheel in its folder, not from this checkout
    wheel = next(space.glob("*.whl"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio-tmp")}
    env.pop("SPACE_ID", None)
    env.pop("PYTHONPATH", None)
    probe = (f"import runpy, sys; sys.argv = [{str(space / 'app.py')!r}, '--help']; "
             "import io, contextlib; f = io.StringIO()\n"
             "with contextlib.redirect_stdout(f):\n"
             "    try:\n        runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "    except SystemExit:\n        pass\n"
             "import cifarlab.demo.core; print(cifarlab.demo.core.__file__)")
    where = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(wheel)), where.stdout + where.stderr

    port = free_port()
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(space / "app.py"), "--port", str(port)], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_served(proc, url, log)
        client = Client(url, verbose=False, download_files=str(tmp_path / "client"))
        example = space / "examples" / f"{reference.classes[1]}.png"

        label, overlay = client.predict(handle_file(str(example)), 3, True, reference.default_layer, 0.5, api_name="/predict")
        want, want_overlay, _ = reference.predict(example, top_k=3, show_cam=True, layer=reference.default_layer, opacity=0.5)
        got = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert list(got) == list(want) and label["label"] == next(iter(want))
        assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-5)
        assert np.asarray(Image.open(overlay).convert("RGB")).shape == want_overlay.shape == (224, 224, 3)

        gallery = client.predict(5, False, "any", "any", api_name="/misclassified")
        expected = reference.misclassified(5, show_cam=False)
        assert [g["caption"] for g in gallery] == [cap for _, cap in expected] and len(expected) > 0
        assert all(np.asarray(Image.open(_gallery_path(g))).shape[:2] == (224, 224) for g in gallery)

        actual = reference.classes[1]
        gallery = client.predict(3, True, actual, "any", api_name="/misclassified")
        expected = reference.misclassified(3, show_cam=True, actual=actual)
        assert [g["caption"] for g in gallery] == [cap for _, cap in expected]
        assert all(g["caption"].startswith(f"{actual} / ") for g in gallery)
        assert all(np.asarray(Image.open(_gallery_path(g))).shape[:2] == (224, 448) for g in gallery)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
