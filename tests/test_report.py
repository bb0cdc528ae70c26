"""The run report: written at the end of ``train`` (with ``--lr auto``), every section
present in both the self-contained HTML and the Markdown, no URLs; ``cifarlab report``
and ``--compare``; a failing report never fails the run."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from cifarlab.report.build import SECTIONS
from tests.tiny_run import shared_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)  # shared: read only here, copy before changing it


def test_train_wrote_report_lr_find_and_predictions(run_dir):
    for name in ("report.html", "README.md", "lr_find.png", "lr_find.json", "predictions.npz",
                 "explain/cams.npz", "explain/explain.json", "explain/misclassified.png"):
        assert (run_dir / name).is_file(), name
    log = (run_dir / "log.txt").read_text()
    assert "lr auto" in log and "suggested LR (valley)" in log and "report written to" in log


def test_lr_auto_trains_with_the_suggestion_as_onecycle_max(run_dir):
    from cifarlab.checkpoint import read_checkpoint

    suggestion = json.loads((run_dir / "lr_find.json").read_text())["suggestion"]
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["config"]["lr"] == "auto"
    assert max(ckpt["lrs"]) == pytest.approx(suggestion, rel=0.2)  # One-Cycle peaks at max_lr
    assert ckpt["lrs"][0] == pytest.approx(suggestion / ckpt["config"]["div_factor"], rel=1e-6)


def test_html_has_every_section_embedded_images_and_no_urls(run_dir):
    html = (run_dir / "report.html").read_text()
    for sid, title in SECTIONS:
        assert f'id="{sid}"' in html, sid
        assert title in html, title
    assert not re.search(r"https?://", html)
    assert not re.search(r"""(?:src|href)=["'](?!data:|#)""", html), "only data: URIs and in-page anchors"
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) >= 7 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in html.lower()
    assert 'class="synthetic"' in html and "SYNTHETIC DATA" in html
    # content, not just headings
    for needle in ("max accuracy", "last-epoch accuracy", "seconds per epoch", "torch",
                   "valley", "One-Cycle", "features.group1", "drop, CAM mask", "class3", "M MACs"):
        assert needle in html, needle


def test_results_table_matches_the_history(run_dir):
    from cifarlab.checkpoint import read_checkpoint

    hist = read_checkpoint(run_dir / "checkpoints" / "last.pt")["history"]
    best = max(hist, key=lambda r: r["test_acc"])
    md = (run_dir / "README.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| test |"))
    assert f"{best['test_acc']:.2%}" in row and f"| {best['epoch']} |" in row and f"{hist[-1]['test_acc']:.2%}" in row


def test_markdown_has_the_same_sections_and_pngs_beside_it(run_dir):
    md = (run_dir / "README.md").read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md, title
    assert "SYNTHETIC DATA" in md
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) >= 7  # lr_find, curves, per-class, confusion, augmentations, 2 galleries
    for rel in linked:
        assert rel.startswith("report_files/") and (run_dir / rel).read_bytes()[:4] == b"\x89PNG"
    assert not re.search(r"https?://", md)


def test_report_command_rebuilds_from_the_run_dir(run_dir, tmp_path, capsys):
    from cifarlab.cli import main

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("report.html", "README.md"):
        (copy / name).unlink()
    shutil.rmtree(copy / "report_files")
    assert main(["report", str(copy), "--device", "cpu", "--misclassified", "4", "--correct", "2", "--top-losses", "3"]) == 0
    assert "report written to" in capsys.readouterr().out
    html = (copy / "report.html").read_text()
    assert all(f'id="{sid}"' in html for sid, _ in SECTIONS)
    assert (copy / "README.md").is_file() and (copy / "report_files" / "lr_find.png").is_file()
    info = json.loads((copy / "explain" / "explain.json").read_text())
    assert len(info["correct"]) == 2 and len(info["top_losses"]) == 3
    assert (copy / "explain" / "top_losses.png").is_file() and (copy / "report_files" / "top_losses.png").is_file()


def test_compare_puts_runs_on_one_page(run_dir, tmp_path, capsys):
    from cifarlab.cli import main

    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    (other / "predictions.npz").unlink()  # forces the evaluate-on-the-fly path for one run
    out = tmp_path / "cmp.html"
    assert main(["report", "--compare", str(run_dir), str(other), "--out", str(out), "--device", "cpu"]) == 0
    html = out.read_text()
    assert run_dir.name in html and "other-run" in html
    for needle in ('id="results"', 'id="curves"', 'id="per-class"', "best test acc", "SYNTHETIC"):
        assert needle in html
    assert not re.search(r"https?://", html)
    assert main(["report", "--compare", str(run_dir)]) == 2
    assert main(["report"]) == 2


def test_a_failing_report_is_logged_and_does_not_fail_the_run(tmp_path, monkeypatch):
    from cifarlab.report import build

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "build_report", boom)
    lines = []
    assert build.after_training(tmp_path, model=None, dataset=None, final_eval=None, epoch=1, write_report=True, log=lines.append) is None
    assert "disk full" in lines[0] and "cifarlab report" in lines[0]


def test_train_has_a_no_report_flag():
    from cifarlab.cli import build_parser

    assert build_parser().parse_args(["train", "--no-report"]).no_report is True
    assert build_parser().parse_args(["train"]).no_report is False


def test_road_numbers_in_the_report_are_those_in_explain_json(run_dir):
    """The faithfulness section's ROAD table: MoRF/LeRF mean drops per gallery, as explain.json has them."""
    faith = json.loads((run_dir / "explain" / "explain.json").read_text())["faithfulness"]
    html = (run_dir / "report.html").read_text()
    md = (run_dir / "README.md").read_text()
    section = md[md.index("## Grad-CAM faithfulness"):]
    assert "20, 40, 60 and 80% of the pixels" in html and "20, 40, 60 and 80% of the pixels" in section
    assert "larger MoRF drop than LeRF drop" in html and "by the Grad-CAM map" in section
    for kind in ("misclassified", "correct", "top_losses"):
        road = faith[kind]["road"]
        assert road["removed"] == [0.2, 0.4, 0.6, 0.8] and road["n"] == faith[kind]["n"]
        assert road["n"] > 0 and road["morf_mean"] == pytest.approx(sum(road["morf_drop"]) / 4)
        morf, lerf = f"{road['morf_mean']:.3f}", f"{road['lerf_mean']:.3f}"
        cells = f'<td class="num">{road["n"]}</td><td class="num">{morf}</td><td class="num">{lerf}</td></tr>'
        assert f"<tr><td>{kind}</td>{cells}" in html, kind
        assert f"| {kind} | {road['n']} | {morf} | {lerf} |" in section, kind


def test_faithfulness_verdict_needs_a_clear_majority_not_just_a_higher_mean():
    from cifarlab.explain.faithfulness import Faithfulness
    from cifarlab.report.build import faithfulness_verdict

    def f(cam, rnd, wins):
        return faithfulness_verdict(Faithfulness(n=20, fraction=0.2, cam_drop=cam, random_drop=rnd, cam_wins=wins))

    assert f(0.4, 0.1, 0.9) == "highlighted pixels matter more than random blobs"
    assert f(0.28, 0.25, 0.5).startswith("mixed") and "50%" in f(0.28, 0.25, 0.5)
    assert f(0.1, 0.3, 0.2) == "no better than masking random blobs"
    assert f(-0.05, 0.1, 0.0) == "masking the highlighted pixels does not lower the prediction"
    assert faithfulness_verdict(Faithfulness(n=0, fraction=0.2, cam_drop=0, random_drop=0, cam_wins=0)) == "no images"


def test_report_of_a_run_whose_dataset_moved_takes_data(tmp_path, cli):
    import numpy as np
    from PIL import Image

    from tests.tiny_run import tiny_fit

    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    for split, n in (("train", 16), ("test", 8)):
        for label in ("a", "b"):
            (data / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(data / split / label / f"{i}.png")
    run = tmp_path / "run"
    tiny_fit(run, dataset="imagefolder", data=str(data), epochs=1, limit_train=None, limit_test=None)
    assert not (run / "report.html").exists()  # trained without one: the one below is new
    moved = data.rename(tmp_path / "moved")

    lost = cli("report", str(run))
    assert lost.returncode == 2 and len(lost.stderr.strip().splitlines()) == 1, lost.stderr[-2000:]
    assert str(data) in lost.stderr
    found = cli("report", str(run), "--data", str(moved))
    assert found.returncode == 0, found.stderr[-2000:]
    assert (run / "report.html").is_file() and (run / "explain" / "cams.npz").is_file()
    assert cli("report", "--compare", str(run), str(run), "--data", str(moved)).returncode == 2


def test_per_class_precision_f1_and_most_confused_pairs_match_the_predictions(run_dir):
    import numpy as np

    from cifarlab.checkpoint import read_checkpoint
    from cifarlab.metrics import classification_report, most_confused

    z = np.load(run_dir / "predictions.npz")
    classes = read_checkpoint(run_dir / "checkpoints" / "last.pt")["classes"]
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (z["targets"], z["logits"].argmax(1)), 1)
    report = classification_report(cm.tolist(), classes)["per_class"]
    md = (run_dir / "README.md").read_text()
    for c in classes:
        r = report[c]
        assert f"| {c} | {r['recall']:.1%} | {r['precision']:.1%} | {r['f1']:.1%} | {r['support']} |" in md, c
    pairs = most_confused(cm.tolist(), classes)
    if pairs:  # the tiny run may make no mistake at all
        actual, predicted, count = pairs[0]
        share = count / cm[classes.index(actual)].sum()
        assert "### Most confused pairs" in md and f"| {actual} | {predicted} | {count} | {share:.1%} |" in md
        assert 'id="most-confused"' in (run_dir / "report.html").read_text()


def test_top_losses_section_lists_the_highest_losses(run_dir):
    import numpy as np
    import torch

    z = np.load(run_dir / "predictions.npz")
    losses = torch.nn.functional.cross_entropy(torch.from_numpy(z["logits"]), torch.from_numpy(z["targets"]), reduction="none")
    top = json.loads((run_dir / "explain" / "explain.json").read_text())["top_losses"]
    assert len(top) == 10  # the default of the report at the end of training
    assert [r["index"] for r in top] == torch.sort(losses, descending=True, stable=True).indices[:10].tolist()
    html = (run_dir / "report.html").read_text()
    section = html.split('id="top-losses"')[1].split("<h2")[0]
    assert "p(actual)" in section and 'src="data:image/png;base64,' in section
    for r in top:
        assert f'<td class="num">{r["index"]}</td>' in section and f"{r['loss']:.3f}" in section
    md = (run_dir / "README.md").read_text()
    assert "(report_files/top_losses.png)" in md.split("## Top losses")[1].split("## ")[0]


def test_each_most_confused_pair_links_to_its_images(run_dir):
    from cifarlab.report.pairs import PAIR_IMAGES

    html = (run_dir / "report.html").read_text()
    md = (run_dir / "README.md").read_text()
    if "### Most confused pairs" not in md:
        pytest.skip("the tiny run made no mistake")
    table = md.split("### Most confused pairs")[1].split("## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| class")]
    assert rows
    for row in rows:
        actual, predicted, count = (cell.strip() for cell in row.strip("|").split("|")[:3])
        link = re.search(r"\[(?:all )?(\d+)(?: most confident)?\]\((report_files/(confused-[^)]+)\.png)\)", row)
        assert link, row
        assert int(link.group(1)) == min(int(count), PAIR_IMAGES)
        assert (run_dir / link.group(2)).read_bytes()[:4] == b"\x89PNG"
        name = link.group(3)
        assert f"-{actual}-{predicted}" in name
        # HTML: the row's in-page link, and the anchor holding that pair's embedded strip
        assert f'<a href="#{name}">' in html
        assert re.search(rf'<div id="{re.escape(name)}"><img src="data:image/png;base64,', html)


def test_report_cam_method_from_the_config_or_the_flag(run_dir, tmp_path, capsys):
    from cifarlab.checkpoint import read_checkpoint, save_checkpoint
    from cifarlab.cli import main

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert json.loads((copy / "explain" / "explain.json").read_text())["method"] == "gradcam"  # the default
    ckpt_path = copy / "checkpoints" / "last.pt"
    ckpt = read_checkpoint(ckpt_path)
    ckpt["config"]["cam"] = "eigencam"  # as `train --cam eigencam` stores it
    save_checkpoint(ckpt_path, ckpt)
    small = ["--device", "cpu", "--misclassified", "2", "--correct", "1", "--top-losses", "0"]
    assert main(["report", str(copy), *small]) == 0
    assert json.loads((copy / "explain" / "explain.json").read_text())["method"] == "eigencam"
    html = (copy / "report.html").read_text()
    assert "Misclassified test images with EigenCAM" in html and "EigenCAM faithfulness" in html
    assert main(["report", str(copy), "--cam", "gradcam++", *small]) == 0  # the flag wins
    assert json.loads((copy / "explain" / "explain.json").read_text())["method"] == "gradcam++"
    assert "## Grad-CAM++ faithfulness" in (copy / "README.md").read_text()
    capsys.readouterr()
