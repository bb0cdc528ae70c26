"""The CLI end to end on synthetic data, as a user runs it: train → evaluate → summary."""

from __future__ import annotations

import json

import pytest
import torch

from cifarlab.checkpoint import read_checkpoint

# Small enough to train in seconds on 2 CPU cores, big enough to learn the synthetic task.
TINY = [
    "--dataset", "synthetic", "--num-classes", "4", "--model", "fast", "--epochs", "3",
    "--batch-size", "64", "--lr", "0.2", "--limit-train", "768", "--limit-test", "256",
    "--device", "cpu", "--seed", "1", "--tta", "none", "--eval-every", "1",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("train", "--preset", "fast", *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_train_writes_a_complete_run_directory(trained_run):
    out, proc = trained_run
    for name in ("config.toml", "metrics.jsonl", "log.txt", "checkpoints/last.pt", "checkpoints/best.pt", "model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
    assert all(r["data"] == "synthetic" for r in rows)
    # it really learns: 4 classes, chance is 25%
    assert rows[-1]["test_acc"] > 0.6
    log = (out / "log.txt").read_text()
    assert "SYNTHETIC" in log and "epoch   3/3" in log
    assert "SYNTHETIC" in proc.stdout


def test_checkpoint_describes_itself(trained_run):
    out, _ = trained_run
    ckpt = read_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["model"]["name"] == "fast" and ckpt["model"]["kwargs"]["num_classes"] == 4
    assert ckpt["classes"] == ["class0", "class1", "class2", "class3"]
    assert ckpt["dataset"]["synthetic"] is True and ckpt["epoch"] == 3
    assert ckpt["config"]["lr"] == 0.2 and "optimizer" in ckpt
    best = read_checkpoint(out / "checkpoints" / "best.pt")
    assert best["best"]["test_acc"] == max(r["test_acc"] for r in ckpt["history"])


def test_resolved_config_reruns_the_same_config(trained_run):
    from cifarlab.config import resolve_config

    out, _ = trained_run
    cfg = resolve_config(config_file=out / "config.toml")
    assert cfg.epochs == 3 and cfg.num_classes == 4 and cfg.out == str(out) and cfg.preset == "fast"


def test_evaluate_json_matches_training_metrics(trained_run, cli):
    out, _ = trained_run
    proc = cli("evaluate", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert set(m) >= {"accuracy", "per_class", "confusion"}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["accuracy"] == pytest.approx(last["test_acc"], abs=1e-6)
    assert sum(map(sum, m["confusion"])) == 256
    assert list(m["per_class"]) == ["class0", "class1", "class2", "class3"]
    assert m["dataset"] == "synthetic"
    # the classification report agrees with the matrix: weighted recall is the accuracy,
    # per-class recall the per-class accuracy, and the pairs are the off-diagonal counts
    report = m["report"]
    assert report["weighted"]["recall"] == pytest.approx(m["accuracy"], abs=1e-9)
    assert [report["per_class"][c]["recall"] for c in m["per_class"]] == pytest.approx(list(m["per_class"].values()))
    classes = list(m["per_class"])
    for actual, predicted, count in m["most_confused"]:
        assert m["confusion"][classes.index(actual)][classes.index(predicted)] == count and actual != predicted
    assert [c for _, _, c in m["most_confused"]] == sorted((c for _, _, c in m["most_confused"]), reverse=True)
    assert all(sum(row) == pytest.approx(1.0) for row in m["confusion_normalized"])
    # the safetensors export gives the same numbers
    proc = cli("evaluate", "--checkpoint", str(out / "model.safetensors"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == pytest.approx(m["accuracy"], abs=1e-6)


def test_evaluate_text_output(trained_run, cli):
    out, _ = trained_run
    proc = cli("evaluate", "--checkpoint", str(out / "checkpoints" / "best.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "confusion matrix" in proc.stdout and "class3" in proc.stdout
    assert "precision" in proc.stdout and "weighted avg" in proc.stdout


def test_resume_cannot_stretch_a_onecycle_schedule(trained_run, cli):
    out, _ = trained_run
    proc = cli("train", "--out", str(out), "--resume", "--epochs", "4")
    assert proc.returncode == 2
    assert "planned for 3 epochs" in proc.stderr


def test_resume_continues_from_last(cli, tmp_path):
    out = tmp_path / "run"
    common = ["--dataset", "synthetic", "--num-classes", "3", "--model", "fast", "--scheduler", "constant",
              "--batch-size", "64", "--lr", "0.05", "--limit-train", "192", "--limit-test", "96", "--device", "cpu"]
    proc = cli("train", "--preset", "fast", *common, "--epochs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    first = read_checkpoint(out / "checkpoints" / "last.pt")
    proc = cli("train", "--out", str(out), "--resume", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    second = read_checkpoint(out / "checkpoints" / "last.pt")
    assert second["epoch"] == 2 and second["step"] == 2 * first["step"]
    # training went on from the saved weights rather than restarting
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in second["state_dict"].items())


def test_summary(cli):
    proc = cli("summary", "--model", "resnet18")
    assert proc.returncode == 0, proc.stderr
    assert "11,173,962 parameters" in proc.stdout and "MACs" in proc.stdout


@pytest.mark.parametrize(
    "args, word",
    [
        (["train", "--epochs", "0"], "epochs"),
        (["train", "--batch-size", "0"], "batch_size"),
        (["train", "--lr", "nan"], "lr"),
        (["train", "--lr", "fast"], "lr"),
        (["train", "--model", "vgg"], "invalid choice"),
        (["train", "--optimizer", "rmsprop"], "optimizer"),
        (["train", "--preset", "nope"], "invalid choice"),
        (["train", "--bogus"], "unrecognized"),
        (["train", "--config", "/nonexistent.toml"], "not found"),
        (["train", "--dataset", "cifar10", "--data", "/nonexistent-dir", "--device", "cpu"], "--data"),
        (["train", "--dataset", "imagefolder", "--data", "/nonexistent-dir", "--device", "cpu"], "nonexistent-dir"),
        (["evaluate", "--checkpoint", "/nonexistent.pt"], "not found"),
        (["train", "--resume", "--out", "/nonexistent-run"], "resume"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, word, tmp_path, monkeypatch, capsys):
    # In-process for speed (each subprocess pays the torch import); the subprocess test
    # below checks the same contract through the real console entry point.
    from cifarlab.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert word in err[0]
    assert not (tmp_path / "runs").exists()  # nothing written before validation


def test_bad_input_through_the_real_entry_point(cli, tmp_path):
    proc = cli("train", "--epochs", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["cifarlab: error: config key 'epochs' must be >= 1 and <= 100000; got 0 (in command line)"]


def test_bad_config_file_rejected_before_data(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "imagefolder"\ndata = "/nonexistent"\nlearning_rate = 0.1\n')
    proc = cli("train", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'learning_rate'" in proc.stderr


@pytest.mark.parametrize(
    "lines, message",
    [
        # the data path does not exist: these must fail on the config, before any data
        ('model = "resnet18"\nwhiten_eps = 1e-2\n',
         "config key 'whiten_eps' applies only to models with a whitening stem (fast, fast-long); model 'resnet18' has none"),
        ('model = "fast"\nwhiten_eps = 0\n', "config key 'whiten_eps' must be > 0.0"),
    ],
)
def test_whiten_eps_is_checked_before_data(lines, message, tmp_path, monkeypatch, capsys):
    from cifarlab.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "imagefolder"\ndata = "/nonexistent"\ndevice = "cpu"\n' + lines)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_holdout_evaluates_on_held_out_train_images_and_says_so(cli, tmp_path):
    """--holdout N tunes without the test split: N training images become the eval split,
    and every output says "holdout" instead of "test"."""
    out = tmp_path / "h"
    args = [a for a in TINY if a not in ("--limit-test", "256")]
    proc = cli("train", "--preset", "fast", *args, "--holdout", "200", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert "768 train / 200 holdout images (held out of train; the test split is not used)" in log
    assert "holdout loss" in log and "final holdout acc" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["eval_split"] == "holdout" for r in rows)
    assert "200 holdout images (held out of train" in (out / "README.md").read_text()
    assert read_checkpoint(out / "checkpoints" / "last.pt")["config"]["holdout"] == 200


def test_eval_every_zero_evaluates_only_after_the_last_epoch(cli, tmp_path):
    out = tmp_path / "e"
    proc = cli("train", "--preset", "fast", *TINY, "--eval-every", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] is None for r in rows] == [True, True, False]
    assert rows[-1]["test_acc"] > 0.25 and rows[0]["train_acc"] > 0
    assert "(test: not evaluated)" in (out / "log.txt").read_text()
    assert (out / "report.html").is_file() and (out / "README.md").is_file()
    best = read_checkpoint(out / "checkpoints" / "last.pt")["best"]
    assert best == {"test_acc": rows[-1]["test_acc"], "epoch": 3}
