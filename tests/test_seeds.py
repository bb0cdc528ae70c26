"""``train --seeds``: one run per seed, summary.json with the spread, and the compare page's
mean ± std row (also for ``report --compare`` of runs that differ only in seed)."""

from __future__ import annotations

import io
import json
import statistics

import pytest

from cifarlab.errors import CifarlabError, TrainingInterrupted
from cifarlab.report.compare import differ_only_in_seed, spread
from cifarlab.seeds import parse_seeds

# 4 steps per epoch, 2 epochs: a few seconds per seed on 2 CPU cores.
TINY_FLAGS = [
    "--preset", "fast", "--dataset", "synthetic", "--num-classes", "4", "--epochs", "2",
    "--batch-size", "32", "--lr", "0.2", "--limit-train", "128", "--limit-test", "64",
    "--device", "cpu", "--tta", "none", "--eval-every", "1",
]


def _tiny_cfg(out, **overrides):
    from cifarlab.config import resolve_config

    from tests.tiny_run import TINY

    return resolve_config(preset="fast", overrides={**TINY, "limit_train": 128, "limit_test": 64, **overrides, "out": str(out)})


def _final_accs(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["test_acc"], max(r["test_acc"] for r in rows)


def test_parse_seeds_accepts_lists_and_refuses_bad_ones():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 7 , 3") == [7, 3]
    assert parse_seeds("5") == [5]
    for bad, words in (("0,x", "comma-separated"), ("", "comma-separated"), ("1,,2", "comma-separated"),
                       ("0,-1", ">= 0"), ("1,2,1", "seed 1 is listed twice")):
        with pytest.raises(CifarlabError, match=words):
            parse_seeds(bad)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0,1", "--seed", "3"], "give either --seed or --seeds, not both"),
        (["--seeds", "0,0"], "seed 0 is listed twice"),
        (["--seeds", "a,b"], "comma-separated list of integer seeds"),
    ],
)
def test_cli_refuses_bad_seeds_in_one_line(tmp_path, capsys, args, message):
    from cifarlab.cli import main

    assert main(["train", *TINY_FLAGS, "--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("cifarlab: error:") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_spread_is_the_sample_std_and_none_for_one_value():
    s = spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)  # n - 1
    assert (s["min"], s["max"]) == (0.5, 0.9)
    assert spread([0.6]) == {"mean": 0.6, "std": None, "min": 0.6, "max": 0.6}
    assert spread([0.6, float("nan")])["mean"] == 0.6  # a never-evaluated run is left out


def test_differ_only_in_seed():
    base = {"model": "fast", "lr": 0.2, "seed": 0, "out": "a"}
    assert differ_only_in_seed([base, {**base, "seed": 1, "out": "b"}])
    assert differ_only_in_seed([base, {**base, "seed": 1, "out": "b", "tensorboard": True}])  # logging only
    assert not differ_only_in_seed([base, {**base, "seed": 1, "lr": 0.1}])
    assert not differ_only_in_seed([base, {**base, "out": "b"}])  # the same seed twice: no spread
    assert not differ_only_in_seed([base])


def test_train_seeds_cli_writes_runs_summary_and_compare(tmp_path, capsys):
    from cifarlab.cli import main

    out = tmp_path / "seeds"
    assert main(["train", *TINY_FLAGS, "--out", str(out), "--seeds", "0,1", "--no-report"]) == 0
    stdout = capsys.readouterr().out
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        assert (run / "model.safetensors").is_file() and not (run / "report.html").exists()
        assert f"seed = {seed}\n" in (run / "config.toml").read_text()
    finals, bests = zip(*(_final_accs(out / f"seed-{s}") for s in (0, 1)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["n"] == 2
    assert [r["seed"] for r in summary["runs"]] == [0, 1] and [r["dir"] for r in summary["runs"]] == ["seed-0", "seed-1"]
    assert [r["final_acc"] for r in summary["runs"]] == list(finals)
    assert summary["final_acc"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["final_acc"]["std"] == pytest.approx(statistics.stdev(finals))
    assert (summary["final_acc"]["min"], summary["final_acc"]["max"]) == (min(finals), max(finals))
    assert summary["best_acc"]["mean"] == pytest.approx(statistics.fmean(bests))
    assert f"{statistics.fmean(finals):.2%}" in stdout and "summary.json" in stdout
    page = (out / "compare.html").read_text()
    assert 'id="seed-spread"' in page and "mean ± std over 2 seeds (0, 1)" in page
    assert f"{statistics.fmean(finals):.2%} ± {statistics.stdev(finals):.2%}" in page
    assert f"{min(finals):.2%} – {max(finals):.2%}" in page
    # `report --compare` of the same runs shows the same row
    assert main(["report", "--compare", str(out / "seed-1"), str(out / "seed-0"), "--out", str(tmp_path / "c.html")]) == 0
    assert "mean ± std over 2 seeds (1, 0)" in (tmp_path / "c.html").read_text()


def test_resume_skips_finished_seeds_and_continues_the_others(tmp_path, monkeypatch):
    from cifarlab.seeds import train_seeds

    out = tmp_path / "s"
    buf = io.StringIO()
    train_seeds(_tiny_cfg(out), [0], progress=False, stream=buf)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_acc"]["std"] is None and "compare.html" not in buf.getvalue()  # one seed: no spread
    with pytest.raises(CifarlabError, match="already holds a run.*--resume"):
        train_seeds(_tiny_cfg(out), [0, 1], progress=False, stream=buf)
    # Seed 1 starts from the stored config (the flags differ: only --resume's changes apply)
    # and is stopped by a real SIGINT after its 3rd step.
    monkeypatch.setenv("CIFARLAB_FAULT", "int@step=3")
    with pytest.raises(TrainingInterrupted, match=r"seed 1: .*To continue all seeds: cifarlab train --out .* --resume --seeds 0,1"):
        train_seeds(_tiny_cfg(out, lr=0.05), [0, 1], resume=True, resume_overrides={}, progress=False, stream=buf)
    assert (out / "seed-1" / "checkpoints" / "last.pt").is_file() and not (out / "seed-1" / "model.safetensors").exists()
    monkeypatch.delenv("CIFARLAB_FAULT")
    mtime = (out / "seed-0" / "model.safetensors").stat().st_mtime_ns
    buf = io.StringIO()
    result = train_seeds(_tiny_cfg(out, lr=0.05), [0, 1], resume=True, resume_overrides={}, progress=False, stream=buf)
    log = buf.getvalue()
    assert "seed 0 (1/2)" in log and "already finished; skipped" in log and "seed 1 (2/2)" in log and "resuming" in log
    assert (out / "seed-0" / "model.safetensors").stat().st_mtime_ns == mtime  # untouched
    assert "lr = 0.2\n" in (out / "seed-1" / "config.toml").read_text() and "seed = 1\n" in (out / "seed-1" / "config.toml").read_text()
    assert result.summary["seeds"] == [0, 1] and len((out / "seed-1" / "metrics.jsonl").read_text().splitlines()) == 2
    assert result.compare is not None and result.compare.is_file()
