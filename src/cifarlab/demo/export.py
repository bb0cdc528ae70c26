"""``cifarlab demo SOURCE --export DIR``: a folder that runs as a Hugging Face Space as it is.

The folder holds::

    app.py                  starts the demo on this folder (``--host``, ``--port``, ``--device``)
    requirements.txt        what cifarlab needs (torch, torchvision, gradio, ...), pinned to this machine's
    cifarlab-<v>-py3-none-any.whl   cifarlab itself, which app.py imports from: no PyPI release needed
    README.md               Spaces front matter (sdk: gradio, ...) and the model card
    model.safetensors       the weights with their description as metadata
    demo_data.npz           the misclassified test images, examples, numbers and figures
    examples/<class>.png    one test image per class
    figures/*.png           curves, per-class accuracy, confusion matrix (the model card shows them)
    .gitattributes          binary files through git LFS, as the Hub wants them
    .cifarlab-export        marks the folder as an export, so exporting again may replace it

Everything is written into a temporary folder beside DIR first and moved into place at
the end: a failed export leaves DIR as it was. The wheel is built from a copy of the
source tree (``python -m build --wheel --no-isolation``), so the build writes nothing into
the checkout and needs no network; a non-editable install is repacked from its files.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from cifarlab.checkpoint import data_provenance
from cifarlab.errors import CifarlabError

MARKER = ".cifarlab-export"
TEMPLATES = Path(__file__).with_name("templates")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_BUILD_TIMEOUT = 600  # seconds; a wheel builds in a few
_LFS = ("*.whl", "*.safetensors", "*.npz", "*.png")
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*")
_RECIPE = ("preset", "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "scheduler",
           "anneal", "pct_start", "label_smoothing", "augment", "progressive_resize", "tta", "precision", "seed",
           "limit_train", "limit_test", "holdout")


def export_space(source: str | os.PathLike, out_dir: str | os.PathLike, *, device: str | None = None,
                 data: str | None = None) -> Path:
    """Write a Hugging Face Space folder for ``source`` (a run directory, a checkpoint or an
    exported folder) into ``out_dir`` and return its path.

    ``out_dir`` must be new, empty or a previous export (which is replaced); anything else
    is refused with a one-line CifarlabError, as are a source the demo cannot open and a
    cifarlab installation no wheel can be made from.
    """
    from cifarlab.demo.core import DemoModel

    out = Path(out_dir)
    _check_out_dir(out)
    model = DemoModel.load(source, device=device, data=data)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise CifarlabError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        _write_folder(staging, model, data)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a Space folder is for sharing
        _replace(staging, out)
    except OSError as exc:
        raise CifarlabError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_out_dir(out: Path) -> None:
    """Refuse to overwrite anything but an empty folder or a previous export."""
    if out.exists() and not out.is_dir():
        raise CifarlabError(f"{out} exists and is not a folder; choose another --export folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CifarlabError(f"{out} is not empty and is not a previous export; choose a new or empty --export folder")


def _replace(staging: Path, out: Path) -> None:
    """Move the finished folder to ``out``; a previous export there is removed only then."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_folder(folder: Path, model, data: str | None) -> None:
    """Every file of the Space into ``folder``."""
    from cifarlab.checkpoint import export_safetensors, read_checkpoint
    from cifarlab.demo.core import DEMO_DATA_FILE

    ckpt = read_checkpoint(model.weights_path)  # the checkpoint the demo model was loaded from
    export_safetensors(folder / "model.safetensors", ckpt)
    model.save_demo_data(folder / DEMO_DATA_FILE)
    examples = _write_examples(folder / "examples", model.examples)
    figures = _write_figures(folder / "figures", model.figures())
    wheel = build_wheel(folder)
    (folder / "requirements.txt").write_text(requirements_text(wheel.name), encoding="utf-8")
    card = card_context(model, ckpt, data, wheel=wheel.name, examples=examples, figures=figures)
    env = _template_env()
    (folder / "app.py").write_text(env.get_template("space_app.py.j2").render(title=card["title"]), encoding="utf-8")
    (folder / "README.md").write_text(env.get_template("space_readme.md.j2").render(**card), encoding="utf-8")
    (folder / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS),
                                           encoding="utf-8")
    (folder / MARKER).write_text(json.dumps({"cifarlab": _version()}) + "\n", encoding="utf-8")


def _safe_name(name: str) -> str:
    """A class name as a portable file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def _write_examples(folder: Path, examples) -> list[dict[str, str]]:
    """examples/<class>.png for each (H, W, 3) uint8 example; returns [{file, name}]."""
    from PIL import Image

    folder.mkdir()
    out, used = [], set()
    for image, name in examples:
        stem = _safe_name(name)
        while stem in used:  # two classes may differ only in characters a file name drops
            stem += "_"
        used.add(stem)
        Image.fromarray(image).save(folder / f"{stem}.png")
        out.append({"file": f"examples/{stem}.png", "name": name})
    return out


def _write_figures(folder: Path, figures: dict[str, bytes]) -> list[dict[str, str]]:
    """figures/<name>.png; returns [{file, alt}] for the model card."""
    alts = {"curves": "loss and accuracy per epoch", "per_class": "per-class accuracy", "confusion": "confusion matrix"}
    if not figures:
        return []
    folder.mkdir()
    out = []
    for name, png in figures.items():
        (folder / f"{name}.png").write_bytes(png)
        out.append({"file": f"figures/{name}.png", "alt": alts.get(name, name)})
    return out


# ---------------------------------------------------------------------------------------------
# requirements.txt and the model card


def _version(dist: str = "cifarlab") -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _public(version: str) -> str:
    """A version without its local label (``2.4.1+cu124`` -> ``2.4.1``): what indexes serve."""
    return version.split("+", 1)[0]


def requirements_text(wheel_name: str) -> str:
    """requirements.txt: what the wheel beside it needs, pinned to the versions running here.

    cifarlab itself is not a line: Spaces installs requirements.txt before the folder's
    other files are in place, so a ``./cifarlab-....whl`` line would fail its build. app.py
    imports cifarlab from the (pure-Python) wheel instead, so no PyPI release is needed.
    """
    needed = ["torch", "torchvision", "gradio"]
    for req in importlib.metadata.requires("cifarlab") or []:
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
        if "extra ==" not in req and name.lower() not in needed:
            needed.append(name.lower())
    pins = "".join(f"{name}=={_public(_version(name))}\n" for name in needed)
    return (
        "# Written by `cifarlab demo --export`; cifarlab itself is the wheel beside this file (app.py\n"
        f"# imports it from {wheel_name}). The CPU index keeps the Space from downloading CUDA torch;\n"
        "# drop the next line on a GPU machine.\n"
        f"--extra-index-url {TORCH_CPU_INDEX}\n" + pins
    )


def data_facts(ckpt: dict[str, Any], data: str | None) -> dict[str, Any]:
    """What the model was trained and evaluated on: synthetic?, the JPEG copy of CIFAR-10?, in words.

    Only the data folder's name goes into the card (:func:`cifarlab.checkpoint.data_provenance`).
    """
    facts = data_provenance(ckpt, data)
    folder, name = facts["folder"], facts["name"]
    if facts["synthetic"]:
        text = "**Synthetic** images generated by cifarlab (`dataset = \"synthetic\"`), not real photographs."
    elif facts["jpeg"]:
        text = (f"CIFAR-10 as re-encoded to JPEG at quality 75 (folder `{folder}`, read as `{name}`): "
                "the same 32x32 images as CIFAR-10 with JPEG compression artefacts.")
    else:
        text = f"`{name}` data from the folder `{folder}`." if folder else f"`{name}` data."
    return {**facts, "words": text}


def _recipe(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The training config's main settings, in a fixed order (unset ones left out)."""
    return [(k, cfg[k]) for k in _RECIPE if cfg.get(k) not in (None, "") and not (k == "holdout" and not cfg[k])]


def _accuracy(info: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Headline accuracy of the shipped weights on the evaluation split, with its standard error."""
    acc = info.get("accuracy", metrics.get("accuracy", info.get("last_acc")))
    n = int(info.get("n_eval") or metrics.get("n") or 0)
    stderr = math.sqrt(acc * (1 - acc) / n) if n and acc is not None else None
    return {"last": acc, "n": n, "stderr": stderr, "split": info.get("eval_split", "test"),
            "epochs": info.get("epochs"), "best": info.get("best_acc"), "best_epoch": info.get("best_epoch")}


def _per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """[{name, acc, n}] from the demo's metrics (per_class accuracies, confusion rows for counts)."""
    per_class = metrics.get("per_class") or {}
    confusion = metrics.get("confusion") or []
    counts = [int(sum(row)) for row in confusion] if len(confusion) == len(per_class) else [None] * len(per_class)
    return [{"name": c, "acc": a, "n": n if n is not None else ""} for (c, a), n in zip(per_class.items(), counts)]


def card_context(model, ckpt: dict[str, Any], data: str | None, *, wheel: str, examples: list[dict[str, str]],
                 figures: list[dict[str, str]]) -> dict[str, Any]:
    """Everything the README template shows (front matter included)."""
    import gradio

    info = dict(model.info)
    metrics = dict(getattr(model, "metrics", None) or {})
    facts = data_facts(ckpt, data)
    spec = ckpt.get("model") or {}
    title = f"cifarlab {spec.get('name', info.get('model', 'model'))} on {'synthetic data' if facts['synthetic'] else facts['folder'] or facts['name']}"
    front = {
        "title": title[:60],
        "emoji": "🔎",
        "colorFrom": "blue",
        "colorTo": "indigo",
        "sdk": "gradio",
        "sdk_version": gradio.__version__,
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "app_file": "app.py",
        "pinned": False,
        "tags": ["image-classification", "cifarlab", "grad-cam"] + (["synthetic-data"] if facts["synthetic"] else []),
    }
    versions = dict(ckpt.get("versions") or {})
    versions.setdefault("torch", _version("torch"))
    versions.setdefault("cifarlab", _version())
    versions["torch_pin"] = _public(_version("torch"))
    classes = list(ckpt["classes"])
    return {
        "front": front,
        "title": title,
        "synthetic": facts["synthetic"],
        "jpeg": facts["jpeg"],
        "data": facts,
        "classes": classes,
        "model": {"name": spec.get("name", info.get("model")), "params": f"{int(info.get('params', 0)):,}",
                  "size": 32, "mean": _rounded(ckpt["mean"]), "std": _rounded(ckpt["std"]), "epoch": ckpt.get("epoch")},
        "versions": versions,
        "recipe": _recipe(ckpt.get("config") or {}),
        "acc": _accuracy(info, metrics),
        "per_class": _per_class_rows(metrics),
        "figures": figures,
        "example_file": examples[0]["file"] if examples else "examples/your-image.png",
        "default_layer": model.default_layer,
        "wheel": wheel,
    }


def _rounded(values) -> str:
    return "(" + ", ".join(f"{float(v):.4f}" for v in values) + ")"


def _template_env():
    """The report's jinja2 environment (filters pct, num, md) over this package's templates."""
    import jinja2

    from cifarlab.report.render import template_env

    env = template_env(False).overlay(loader=jinja2.FileSystemLoader(str(TEMPLATES)))
    env.filters["yaml"] = lambda v: json.dumps(v, ensure_ascii=False)  # JSON scalars and lists are YAML
    env.filters["pyrepr"] = repr  # a Python literal in app.py, whatever the title holds
    return env


# ---------------------------------------------------------------------------------------------
# the cifarlab wheel


def build_wheel(dest: Path) -> Path:
    """Put a wheel of the running cifarlab into ``dest`` and return its path.

    An editable install (a source checkout) is built from a temporary copy of its tree so
    the checkout stays clean; any other install is repacked from its installed files.
    """
    root = source_tree()
    if root is None:
        return repack_installed(dest)
    with tempfile.TemporaryDirectory(prefix="cifarlab-wheel-") as tmp:
        copy = Path(tmp) / "src"
        _copy_source(root, copy)
        dist = Path(tmp) / "dist"
        if importlib.util.find_spec("build") is not None:
            cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(copy)]
        else:  # pip is always there; `build` only comes with the dev extra
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(copy)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CifarlabError(f"building the cifarlab wheel from {root} took over {_BUILD_TIMEOUT} s; export again") from None
        wheels = sorted(dist.glob("cifarlab-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise CifarlabError(f"building the cifarlab wheel from {root} failed: {why}")
        return Path(shutil.copy2(wheels[-1], dest / wheels[-1].name))


def source_tree() -> Path | None:
    """The checkout the running cifarlab is imported from (``ROOT/src/cifarlab``), or None."""
    import cifarlab

    package = Path(cifarlab.__file__).resolve().parent
    root = package.parent.parent
    project = root / "pyproject.toml"
    if package.parent.name != "src" or not project.is_file():
        return None
    return root if re.search(r'(?m)^name\s*=\s*"cifarlab"', project.read_text(encoding="utf-8")) else None


def _copy_source(root: Path, copy: Path) -> None:
    """The files a wheel build reads: the build files at the root, and src/ without caches."""
    copy.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "LICENSE.txt"):
        if (root / name).is_file():
            shutil.copy2(root / name, copy / name)
    shutil.copytree(root / "src", copy / "src", ignore=_COPY_IGNORE)


def repack_installed(dest: Path, dist_name: str = "cifarlab") -> Path:
    """A wheel of an installed (non-editable) distribution, from the files its RECORD lists.

    Byte-compiled files, scripts outside site-packages and the installer's own records
    (INSTALLER, REQUESTED, direct_url.json, RECORD) are left out; RECORD is written anew.
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise CifarlabError(f"{dist_name} is not installed as a distribution; install it (pip install .) and export again") from None
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    info_dir = f"{name}-{dist.version}.dist-info"
    files = [f for f in dist.files or [] if not f.as_posix().startswith("..") and "__pycache__" not in f.parts
             and f.suffix != ".pyc"]
    skip = {f"{info_dir}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    if not any(f.as_posix() == f"{info_dir}/WHEEL" for f in files):
        raise CifarlabError(f"cannot build a {dist_name} wheel: the installed copy has no source tree and no "
                            f"{info_dir}/WHEEL to repack; install it from a checkout (pip install -e .) and export again")
    wheel = dest / f"{name}-{dist.version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            rel = f.as_posix()
            if rel in skip:
                continue
            blob = Path(f.locate()).read_bytes()
            zf.writestr(rel, blob)
            digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode("ascii")
            records.append(f"{rel},sha256={digest},{len(blob)}")
        records.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    return wheel
