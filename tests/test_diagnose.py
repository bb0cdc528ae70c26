"""Issue 24's diagnosis driver (benchmarks/reference/diagnose.py): its arms parse with the
real parsers, its table's arithmetic on hand-made rows with known answers, and its
resume logic. Only the last test trains (two tiny runs on synthetic data)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "reference" / "diagnose.py"


@pytest.fixture(scope="module")
def dg():
    spec = importlib.util.spec_from_file_location("diagnose_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _ctx(**kw):
    base = dict(dataset="imagefolder", data="/d", holdout=5000, limit_train=None, limit_test=None, smoke=False)
    return argparse.Namespace(**{**base, **kw})


def _row(dg, ctx, name, seed, acc_tta, acc=None, train_s=100.0, precision="bf16", **extra):
    arm = dg.ARMS_BY_NAME[name]
    return {"arm": name, "side": arm.side, "seed": seed, **dg.signature(arm, ctx), "acc_tta": acc_tta, "acc": acc,
            "train_s": train_s, "precision": precision, "machine": {"cpu": "test cpu"}, **extra}


# ------------------------------------------------------------------ the arms


def test_every_arm_parses_with_the_real_parsers(dg, tmp_path):
    for arm in dg.ARMS:
        dg.check_arm(arm, tmp_path)  # raises on a flag or value either command refuses


def test_a_misspelt_or_abbreviated_flag_is_refused(dg, tmp_path):
    for flags in ({"--tta-padding": "constant"}, {"--tta-p": "constant"}):  # argparse takes the 2nd
        with pytest.raises(ValueError, match="X1"):
            dg.check_arm(dg.Arm("X1", "reference", None, "x", "x", flags), tmp_path)
    with pytest.raises(ValueError, match="X2"):
        dg.check_arm(dg.Arm("X2", "cifarlab", None, "x", "x", {"--epoch": "8"}), tmp_path)
    from cifarlab.errors import CifarlabError

    with pytest.raises(CifarlabError, match="pct_start"):
        dg.check_arm(dg.Arm("X3", "cifarlab", None, "x", "x", config={"pct_start": 2.0}), tmp_path)


def test_chains_change_one_thing_per_step_and_accumulate(dg):
    for arm in dg.ARMS:
        assert arm.name[0] == {"reference": "R", "cifarlab": "F"}[arm.side]
        if arm.parent is None:
            continue
        parent = dg.ARMS_BY_NAME[arm.parent]
        assert parent.side == arm.side and dg.ARMS.index(parent) < dg.ARMS.index(arm)
        assert dg.resolved(arm) != dg.resolved(parent)
        # one difference; F4's is one too (the batch, with the LRs that follow from it)
        assert len(arm.flags) + len(arm.config) == (3 if arm.name == "F4" else 1)
    assert dg.arm_args(dg.ARMS_BY_NAME["R2"]) == ["--tta-pad", "constant", "--norm-stats", "data"]
    assert dg.resolved(dg.ARMS_BY_NAME["F4"])[1] == {"pct_start": 1e-6}  # inherited from F3


def test_bridges_compare_runs_at_matched_settings(dg, tmp_path):
    for ref_name, lab_name, _ in dg.BRIDGES[:2]:
        ref = dg.check_arm(dg.ARMS_BY_NAME[ref_name], tmp_path)
        cfg = dg.check_arm(dg.ARMS_BY_NAME[lab_name], tmp_path)
        assert (ref.epochs, ref.batch_size) == (cfg.epochs, cfg.batch_size)
        assert cfg.progressive_resize == "none" and ref.tta_pad == "constant" and ref.norm_stats == "data"
        assert ref.ns_steps == 5 and ref.whiten_bias_epochs == ref.epochs
        assert cfg.pct_start == 1e-6 and cfg.tta == "flip-translate"


def test_fast_lr_rule_gives_the_preset_and_the_batch_2000_arm(dg, tmp_path):
    shipped = dg.check_arm(dg.ARMS_BY_NAME["F0"], tmp_path)
    assert shipped.lr == pytest.approx(0.67 * 1024 * (9 / 256) ** 2, rel=0.01)  # fast.toml's rule
    f4 = dg.check_arm(dg.ARMS_BY_NAME["F4"], tmp_path)
    assert f4.batch_size == 2000 and f4.lr == pytest.approx(0.67 * 2000 * (9 / 256) ** 2, rel=1e-4)
    assert f4.lr * f4.weight_decay == pytest.approx(2e-6 * 2000, rel=1e-4)  # airbench's per-step decay


def test_config_files_are_valid_toml(dg, tmp_path):
    path = dg.config_file(dg.ARMS_BY_NAME["F3"], tmp_path)
    assert tomllib.loads(path.read_text()) == {"pct_start": 1e-6}
    assert dg.config_file(dg.ARMS_BY_NAME["F2"], tmp_path) is None
    assert tomllib.loads(dg.config_text({"a": "x\"y", "b": True, "c": 3})) == {"a": 'x"y', "b": True, "c": 3}


def test_commands_carry_data_seed_and_arm_flags(dg, tmp_path):
    ctx = _ctx(smoke=True)
    ref = dg.command(dg.ARMS_BY_NAME["R5"], 1, ctx, tmp_path)
    assert ref[ref.index("--holdout") + 1] == "5000" and ref[ref.index("--seed") + 1] == "1"
    assert ref[-4:] == ["--epochs", "1", "--batch-size", "100"]  # smoke flags last: they win
    assert "--eval-every-epoch" not in ref
    lab = dg.command(dg.ARMS_BY_NAME["F3"], 0, ctx, tmp_path)
    assert lab[lab.index("--preset") + 1] == "fast" and lab[lab.index("--out") + 1] == str(tmp_path / "F3" / "cifarlab-seed0")
    assert lab[lab.index("--config") + 1] == str(tmp_path / "configs" / "F3.toml") and "--no-report" in lab


# ------------------------------------------------------------------ the table's arithmetic


def test_stats_paired_and_finding_known_answers(dg):
    a = {0: 0.930, 1: 0.932}
    b = {0: 0.935, 1: 0.936, 2: 0.90}
    sa, sb = dg.stats(a), dg.stats(b)
    assert sa["mean"] == pytest.approx(0.931) and sa["spread"] == pytest.approx(0.002)
    assert (sb["lo"], sb["hi"], sb["n"]) == (0.90, 0.936, 3)
    d = dg.paired(b, a)  # seed 2 has no partner
    assert d["n"] == 2 and d["diffs"] == pytest.approx({0: 0.005, 1: 0.004}) and d["mean"] == pytest.approx(0.0045)
    assert dg.finding(d, sa, sa) is True  # 0.45 pp > 0.2 pp
    assert dg.finding(d, sa, sb) is False  # b's spread (3.6 pp) is larger
    assert dg.finding(dg.paired({0: 0.95}, {0: 0.90}), dg.stats({0: 0.95}), dg.stats({0: 0.90})) is None  # 1 seed
    assert dg.paired({0: 0.9}, {1: 0.9}) is None and dg.stats({}) is None


def test_table_on_hand_made_rows(dg):
    ctx = _ctx()
    rows = [
        _row(dg, ctx, "R0", 0, 0.9000),  # an earlier repeat of seed 0: the later row wins
        _row(dg, ctx, "R0", 0, 0.9300, acc=0.9200, train_s=900.0),
        _row(dg, ctx, "R0", 1, 0.9320, acc=0.9240, train_s=1100.0),
        _row(dg, ctx, "R1", 0, 0.9350), _row(dg, ctx, "R1", 1, 0.9360),
        _row(dg, ctx, "R2", 0, 0.9356), _row(dg, ctx, "R2", 1, 0.9350),
        _row(dg, ctx, "R3", 0, None, error="SystemExit: exit 1"),  # failed: ignored
        {**_row(dg, ctx, "R3", 1, 0.95), "args": ["--ns-steps", "7"]},  # an older definition: ignored
        _row(dg, ctx, "R5", 0, 0.9400), _row(dg, ctx, "R5", 1, 0.9410),
        _row(dg, ctx, "F3", 0, 0.9300, precision="fp32"), _row(dg, ctx, "F3", 1, 0.9320, precision="fp32"),
    ]
    text = dg.table(rows, ctx)
    arms_part = text.split("Bridges")[0]
    lines = {line.split(" | ")[0].strip("| "): line for line in arms_part.splitlines() if line.startswith("| ")}
    r0 = lines["R0"].split(" | ")
    assert r0[3:6] == ["0: 93.00, 1: 93.20", "93.10", "93.00-93.20 (0.20)"]
    assert r0[8:10] == ["92.20", "1000"]  # no-TTA mean, mean train seconds
    assert "+0.45 (+0.50, +0.40) | **yes**" in lines["R1"]
    assert "-0.02 (+0.06, -0.10) | no" in lines["R2"]  # |-0.02| < R2's spread 0.06 and R1's 0.10
    assert "| R3 | R2 | Newton-Schulz: 5 steps | not run |" in lines["R3"]
    bridge = next(line for line in text.splitlines() if line.startswith("| R5 | F3 |"))
    assert "-0.95 (-1.00, -0.90) | **yes**" in bridge  # F3 - R5; spreads 0.20 and 0.10 pp
    assert "R5 vs F3 mixes precisions" in text and "2 successful rows ignored" in text


def test_table_finding_needs_the_spread_of_both_arms(dg):
    ctx = _ctx()
    rows = [_row(dg, ctx, "R5", 0, 0.9400), _row(dg, ctx, "R5", 1, 0.9402),  # spread 0.02 pp
            _row(dg, ctx, "F3", 0, 0.9300), _row(dg, ctx, "F3", 1, 0.9420)]  # spread 1.20 pp
    bridge = next(line for line in dg.table(rows, ctx).splitlines() if line.startswith("| R5 | F3 |"))
    assert "-0.41 (-1.00, +0.18) | no" in bridge  # beats R5's spread, not F3's


# ------------------------------------------------------------------ resuming


def test_todo_skips_finished_runs_of_the_same_flags_and_data(dg):
    ctx = _ctx()
    r0, f0 = dg.ARMS_BY_NAME["R0"], dg.ARMS_BY_NAME["F0"]
    rows = [_row(dg, ctx, "R0", 0, 0.93),
            _row(dg, ctx, "R0", 1, None, error="SystemExit: exit 1"),  # failed: redo
            _row(dg, _ctx(holdout=0), "F0", 0, 0.93)]  # other data: redo
    assert [(a.name, s) for a, s in dg.todo(rows, [r0, f0], [0, 1], ctx)] == [("R0", 1), ("F0", 0), ("F0", 1)]
    assert dg.todo(rows, [r0], [0], ctx) == []
    assert dg.todo(rows, [r0], [0], _ctx(smoke=True)) != []  # smoke runs are other runs


def test_run_all_appends_one_row_per_run_and_skips_them_next_time(dg, tmp_path, monkeypatch):
    out = tmp_path / "d.jsonl"
    ran = []

    def fake_run(arm, seed, ctx, keep, env):
        ran.append((arm.name, seed))
        if arm.name == "F1" and seed == 1:
            raise SystemExit("versus: error: exit 1 from: ...")
        return {"acc": 0.9, "acc_tta": 0.91 + seed / 100, "train_s": 5.0, "wall_s": 6.0, "precision": "fp32"}

    monkeypatch.setattr(dg, "run_arm", fake_run)
    monkeypatch.setattr(dg.versus, "warm_cache", lambda *a: None)
    monkeypatch.setattr(dg.versus, "machine_info", lambda env: {"cpu": "test cpu", "flags": ["avx2"]})
    ctx = _ctx(out=str(out), keep=str(tmp_path / "keep"), threads=None, warm=False)
    arms = [dg.ARMS_BY_NAME["R1"], dg.ARMS_BY_NAME["F1"]]
    assert dg.run_all(ctx, arms, [0, 1]) == 1  # one run failed
    rows = dg.read_rows(out)
    assert [(r["arm"], r["seed"], bool(r.get("error"))) for r in rows] == [
        ("R1", 0, False), ("R1", 1, False), ("F1", 0, False), ("F1", 1, True)]
    assert rows[0]["machine"]["cpu"] == "test cpu" and rows[0]["args"] == ["--tta-pad", "constant"]
    assert rows[0]["command"].endswith("--seed 0 --tta-pad constant") and rows[3]["error"].startswith("SystemExit")
    ran.clear()
    assert dg.run_all(ctx, arms, [0, 1]) == 1 and ran == [("F1", 1)]  # only the failed one again
    ran.clear()
    assert dg.run_all(ctx, arms, [0, 1]) == 1 and ran == [("F1", 1)]


def test_smoke_end_to_end_on_tiny_synthetic_data(tmp_path):
    out = tmp_path / "d.jsonl"
    base = [sys.executable, str(SCRIPT), "--dataset", "synthetic", "--holdout", "300", "--limit-train", "200",
            "--limit-test", "100", "--smoke", "--seeds", "1", "--no-warm", "--arms", "R0,F0",
            "--out", str(out), "--keep", str(tmp_path / "keep")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(base, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["R0", "F0"]
    assert rows[1]["plain_eval_n"] == 100 and "plain_eval_error" not in rows[1]
    for r in rows:
        assert 0 <= r["acc_tta"] <= 1 and 0 <= r["acc"] <= 1 and r["epochs"] == 1 and r["train_s"] > 0
        assert r["smoke"] is True and r["machine"]["cores"] >= 1 and r["precision"] in ("fp32", "bf16")
    again = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "0 runs to do" in again.stderr and len(out.read_text().splitlines()) == 2
    table = subprocess.run([*base, "--table"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert table.returncode == 0 and "| R0 |  | published recipe | 0: " in table.stdout
