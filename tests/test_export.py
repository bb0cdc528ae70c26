"""``cifarlab export``: ONNX, .pt2 and Hugging Face-style exports of every registered model,
loaded back without cifarlab where the format allows, and the CLI end to end.

Exporting costs seconds per model (the ONNX exporter most), so every model is exported
once, in a module fixture, with random weights and perturbed BatchNorm statistics (a
random-init BatchNorm is the identity and would hide a wrong normalisation).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.tiny_run import shared_run

# (model, norm, tta, batch): every registered model, the three norms on resnet18, the
# fast net with the preset's flip-translate TTA in the graph, and one fixed batch size.
CASES = [
    ("fast", "batch", "flip-translate", None),
    ("fast-long", "batch", "none", 5),
    ("resnet18", "batch", "none", None),
    ("resnet18", "group", "none", None),
    ("resnet18", "layer", "none", None),
    ("resnet34", "batch", "none", None),
]
N_VERIFY = 48


def _case_id(case) -> str:
    return "-".join(str(v) for v in case if v is not None)


def _checkpoint(path: Path, name: str, norm: str, tta: str) -> Path:
    """A cifarlab checkpoint of ``name`` with random weights, on 10-class synthetic data."""
    from cifarlab.checkpoint import save_checkpoint
    from cifarlab.models import create_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "norm": norm, "dropout": 0.0}
    model = create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    config = {"dataset": "synthetic", "num_classes": 10, "synthetic_train": 40, "synthetic_test": N_VERIFY,
              "tta": tta, "model": name, "norm": norm, "epochs": 1}
    save_checkpoint(path, {
        "model": {"name": name, "kwargs": kwargs},
        "state_dict": model.state_dict(),
        "classes": [f"class{i}" for i in range(10)],
        "mean": [0.45, 0.5, 0.55],
        "std": [0.2, 0.25, 0.3],
        "dataset": {"name": "synthetic", "root": None, "synthetic": True},
        "config": config,
        "epoch": 1,
    })
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (checkpoint, output folder, printed lines)} for every case, all three formats."""
    from cifarlab.export.pipeline import export_source

    root = tmp_path_factory.mktemp("export-models")
    out = {}
    for case in CASES:
        name, norm, tta, batch = case
        folder = root / _case_id(case)
        folder.mkdir()
        ckpt = _checkpoint(folder / "model.pt", name, norm, tta)
        lines: list[str] = []
        export_source(ckpt, ["onnx", "pt2", "hf"], batch=batch, n=N_VERIFY, log=lines.append)
        out[case] = (ckpt, folder / "export", lines)
    return out


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_model_exports_verified(exported, case):
    _, out, lines = exported[case]
    verified = [line for line in lines if line.startswith("verified ")]
    assert [line.split(":")[0] for line in verified] == ["verified onnx", "verified pt2", "verified hf"]
    for line in verified:
        assert f"{N_VERIFY} synthetic test images, top-1 agrees on {N_VERIFY}/{N_VERIFY}" in line
    assert (out / "model.onnx").is_file() and (out / "model.pt2").is_file()
    assert {p.name for p in (out / "hf").iterdir()} == {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


_NO_CIFARLAB = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnxruntime as ort, torch
    out = {}
    for job in json.loads(sys.argv[1]):
        pixels = np.load(job["pixels"])
        session = ort.InferenceSession(job["onnx"], providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        chunks = [pixels[i:i + job["batch"]] for i in range(0, len(pixels), job["batch"])]
        onnx_logits = np.concatenate([session.run(None, {"pixels": c})[0] for c in chunks])
        program = torch.export.load(job["pt2"]).module()
        with torch.no_grad():
            pt2_logits = torch.cat([program(torch.from_numpy(c)) for c in chunks]).numpy()
        np.save(job["onnx_out"], onnx_logits)
        np.save(job["pt2_out"], pt2_logits)
        out[job["onnx"]] = json.loads(meta["classes"])
    assert not [m for m in sys.modules if m.split(".")[0] == "cifarlab"], "cifarlab was imported"
    print(json.dumps(out))
    """
)


def test_onnx_and_pt2_load_without_cifarlab(exported, tmp_path):
    """ONNX Runtime and torch.export.load, in a process that never imports cifarlab, give the checkpoint's logits."""
    from cifarlab.checkpoint import read_checkpoint
    from cifarlab.export.source import Source
    from cifarlab.export.verify import reference_logits, synthetic_images

    pixels = synthetic_images(10, "test").pixels
    jobs, refs = [], {}
    for case, (ckpt, out, _) in exported.items():
        name = _case_id(case)
        np.save(tmp_path / f"{name}.npy", pixels.numpy())
        # A fixed-batch graph takes exactly that batch: 10 images are two batches of 5.
        jobs.append({"onnx": str(out / "model.onnx"), "pt2": str(out / "model.pt2"), "pixels": str(tmp_path / f"{name}.npy"),
                     "batch": case[3] or 10, "onnx_out": str(tmp_path / f"{name}-onnx.npy"), "pt2_out": str(tmp_path / f"{name}-pt2.npy")})
        refs[name] = reference_logits(Source(ckpt, None, read_checkpoint(ckpt)), pixels, case[2])
    proc = subprocess.run([sys.executable, "-c", _NO_CIFARLAB, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = json.loads(proc.stdout)
    for case in CASES:
        name = _case_id(case)
        assert classes[str(exported[case][1] / "model.onnx")] == [f"class{i}" for i in range(10)]
        for fmt in ("onnx", "pt2"):
            got = torch.from_numpy(np.load(tmp_path / f"{name}-{fmt}.npy"))
            assert got.shape == (10, 10)
            assert (got - refs[name]).abs().max() < 1e-3, (name, fmt)


def test_onnx_metadata_and_signature(exported):
    import onnx

    case = CASES[0]
    model = onnx.load(str(exported[case][1] / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["cifarlab"])
    assert meta["input"]["dtype"] == "uint8" and meta["tta"] == "flip-translate" and meta["batch"] == "dynamic"
    assert meta["mean"] == [0.45, 0.5, 0.55] and meta["source"]["checkpoint"] == "../model.pt"
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [3, 32, 32]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    fixed = onnx.load(str(exported[CASES[1]][1] / "model.onnx")).graph.input[0]
    assert fixed.type.tensor_type.shape.dim[0].dim_value == 5
    assert outp.name == "logits"


def test_hf_folder_loads_back_with_its_card(exported):
    import cifarlab
    from cifarlab.checkpoint import load_checkpoint

    ckpt, out, _ = exported[("resnet18", "layer", "none", None)]
    model, info = cifarlab.load_pretrained(out / "hf")
    ref, ref_info = load_checkpoint(ckpt)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert info["classes"] == ref_info["classes"] and info["mean"] == [0.45, 0.5, 0.55]
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["model_kwargs"]["norm"] == "layer"
    assert config["id2label"]["3"] == "class3" and config["label2id"]["class3"] == 3 and config["num_classes"] == 10
    card = (out / "hf" / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: cifarlab", "license: mit", "pipeline_tag: image-classification", "- accuracy"):
        assert line in front
    assert "synthetic-data" in front and "Warning: synthetic data" in card
    assert "| class9 |" in card and "verified hf:" in card and "load_pretrained" in card
    for f in (out / "hf").iterdir():  # nothing that could be a pickle
        assert not zipfile.is_zipfile(f) and f.read_bytes()[:2] != b"\x80\x02"


def test_compare_passes_ties_and_fails_on_disagreement_or_large_differences():
    from cifarlab.export.verify import TOLERANCE, compare

    ref = torch.tensor([[1.0, 0.0, 0.5], [0.3, 0.3 + 1e-6, 0.0], [0.0, 2.0, 1.0]])
    tie = ref.clone()
    tie[1, 0] += 3e-6  # the two leading classes were 1e-6 apart: a numerical tie, not a disagreement
    v = compare("onnx", tie, ref, "test images", "x")
    assert v.ok and (v.agree, v.ties) == (2, 1) and "(+1 numerical ties" in v.line()
    flipped = ref.clone()
    flipped[2, 2] = 2.5  # a real disagreement, far beyond the tolerance
    v = compare("onnx", flipped, ref, "test images", "x")
    assert not v.ok and v.agree == 2 and v.line().startswith("FAILED onnx: 3 test images, top-1 agrees on 2/3")
    drift = ref + torch.tensor([0.0, 0.0, 2 * TOLERANCE])  # same top-1 everywhere, logits too far apart
    v = compare("pt2", drift, ref, "test images", "x")
    assert not v.ok and v.agree == 3 and "must be < 0.001" in v.line()
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not compare("hf", nan, ref, "test images", "x").ok


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A copy of the shared tiny run (this module writes RUN_DIR/export into it)."""
    run = tmp_path_factory.mktemp("export-run") / "run"
    shutil.copytree(shared_run(tmp_path_factory), run)
    return run


@pytest.fixture(scope="module")
def cli_export(run_dir):
    """``cifarlab export RUN_DIR`` as a user runs it: all formats, default output folder."""
    return run_cli("export", str(run_dir), "--n", "64", timeout=600)


def test_cli_exports_a_run(cli_export, run_dir):
    assert cli_export.returncode == 0, cli_export.stderr[-3000:]
    lines = cli_export.stdout.splitlines()
    verified = [line for line in lines if line.startswith("verified ")]
    assert len(verified) == 3, cli_export.stdout
    assert verified[0].startswith("verified onnx: 64 synthetic test images, top-1 agrees on 64/64, max |logit diff| ")
    assert verified[0].endswith(f"(onnxruntime {__import__('onnxruntime').__version__}, CPU)")
    for name in ("model.onnx", "model.pt2", "hf"):
        assert f"wrote {run_dir / 'export' / name}" in lines
    card = (run_dir / "export" / "hf" / "README.md").read_text()
    assert "**Test accuracy:" in card and "the run's final evaluation" in card and "| class3 |" in card


def test_cli_check_reverifies_each_export(cli_export, run_dir, capsys):
    from cifarlab.cli import main

    assert cli_export.returncode == 0
    for name in ("model.onnx", "model.pt2", "hf"):
        assert main(["export", "--check", str(run_dir / "export" / name), "--n", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count("verified ") == 3 and "16 synthetic test images, top-1 agrees on 16/16" in out


def test_check_refuses_other_weights(cli_export, run_dir, tmp_path, capsys):
    from cifarlab.cli import main

    other = _checkpoint(tmp_path / "other.pt", "fast", "batch", "none")
    assert main(["export", "--check", str(run_dir / "export" / "model.pt2"), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cifarlab: error: ") and "other weights" in err and "\n" not in err


def _foreign_files(tmp_path: Path) -> dict[str, Path]:
    """Files that --check must refuse with one line: garbage, foreign models, a pickle inside a .pt2."""
    import onnx
    from onnx import TensorProto, helper

    files = {}
    files["garbage.onnx"] = tmp_path / "garbage.onnx"
    files["garbage.onnx"].write_bytes(b"\x08\x07not a protobuf at all" * 10)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    files["foreign.onnx"] = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(files["foreign.onnx"]))
    files["foreign.pt2"] = tmp_path / "foreign.pt2"
    torch.export.save(torch.export.export(torch.nn.ReLU(), (torch.zeros(2),)), str(files["foreign.pt2"]))
    files["zip.pt2"] = tmp_path / "zip.pt2"
    with zipfile.ZipFile(files["zip.pt2"], "w") as z:
        z.writestr("hello.txt", "hi")
    files["truncated.pt2"] = tmp_path / "truncated.pt2"
    files["truncated.pt2"].write_bytes(files["foreign.pt2"].read_bytes()[:500])
    files["notes.txt"] = tmp_path / "notes.txt"
    files["notes.txt"].write_text("hello")
    files["empty-folder"] = tmp_path / "empty-folder"
    files["empty-folder"].mkdir()
    files["missing.onnx"] = tmp_path / "missing.onnx"
    return files


def test_check_refuses_corrupt_and_foreign_files_with_one_line(tmp_path, capsys):
    from cifarlab.cli import main

    for name, path in _foreign_files(tmp_path).items():
        assert main(["export", "--check", str(path)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("cifarlab: error: ") and "\n" not in err, (name, err)


def test_check_refuses_a_pt2_that_would_unpickle(cli_export, run_dir, tmp_path, capsys):
    """torch.export.load unpickles entries marked use_pickle; --check refuses before loading."""
    from cifarlab.cli import main

    src, dest = run_dir / "export" / "model.pt2", tmp_path / "evil.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            zout.writestr(item, data)
    assert main(["export", "--check", str(dest), str(run_dir)]) == 2
    assert "refusing to load" in capsys.readouterr().err


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys):
    from cifarlab.cli import main

    bad = [
        ["export", str(tmp_path / "no-such-run")],
        ["export", str(tmp_path)],  # a folder that is no run
        ["export"],
        ["export", str(tmp_path), "--format", "tflite"],
        ["export", str(tmp_path), "--batch", "0"],
        ["export", "--check", str(tmp_path / "x.onnx"), "--format", "onnx"],
    ]
    for argv in bad:
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse's own errors (bad choice, bad --batch)
            status = exc.code
        assert status == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(("cifarlab: error: ", "cifarlab export: error: ")) and "\n" not in err, (argv, err)


def test_a_failed_verification_deletes_the_output_and_exits_4(run_dir, tmp_path, monkeypatch, capsys):
    from cifarlab.cli import main
    from cifarlab.export import pt2

    real = pt2.pt2_runner

    def off_by_a_bit(path):
        run, desc = real(path)
        return (lambda x: run(x) + torch.linspace(0, 0.01, 4)), desc

    monkeypatch.setattr(pt2, "pt2_runner", off_by_a_bit)
    (tmp_path / "model.pt2").write_bytes(b"an older export")
    assert main(["export", str(run_dir), "--format", "pt2", "--out", str(tmp_path), "--n", "16"]) == 4
    captured = capsys.readouterr()
    assert "FAILED pt2: 16 synthetic test images" in captured.out and "max |logit diff| 1.0e-02 (must be < 0.001)" in captured.out
    err = captured.err.strip()
    assert err.startswith("cifarlab: error: FAILED pt2") and "deleted" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


ONNX_SNIPPET = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnxruntime as ort
    from PIL import Image

    model_path, image_path = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    img = Image.open(image_path).convert("RGB").resize((32, 32), Image.BILINEAR)
    pixels = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)[None])  # uint8 (1, 3, 32, 32)
    logits = session.run(None, {"pixels": pixels})[0][0]
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    print(classes[int(probs.argmax())], f"{probs.max():.1%}")
    """
)


def test_readme_onnx_snippet_classifies_an_image_file_like_predict(cli_export, run_dir, tmp_path):
    """The README's onnxruntime snippet (neither torch nor cifarlab imported) agrees with
    ``cifarlab predict`` on the class and with the checkpoint in fp32 on the probability
    (predict may run in bf16)."""
    from PIL import Image

    from cifarlab.data.sources import decode_images
    from cifarlab.data.synthetic import generate_synthetic
    from cifarlab.export.source import open_source
    from cifarlab.export.verify import reference_logits
    from cifarlab.predict import predict_files

    src = open_source(run_dir)
    images, _ = generate_synthetic(3, 4, torch.Generator().manual_seed(5))
    for i, img in enumerate(images):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((45, 45)).save(path)  # not 32x32: the resize is exercised
        code = ONNX_SNIPPET + "assert not {m.split('.')[0] for m in sys.modules} & {'torch', 'cifarlab'}\n"
        proc = subprocess.run([sys.executable, "-c", code, str(run_dir / "export" / "model.onnx"), str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        name, percent = proc.stdout.split()
        (pred,) = predict_files([path], run_dir / "checkpoints" / "last.pt", device="cpu", topk=1)
        assert name == pred.top[0][0]
        pixels, _ = decode_images([str(path)])
        prob = reference_logits(src, pixels, "none").softmax(1).max()
        assert abs(float(percent.rstrip("%")) / 100 - float(prob)) <= 0.0006
