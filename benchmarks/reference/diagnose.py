"""Issue 24's diagnosis: move the reference toward `fast` (and `fast` toward the reference)
one difference at a time, on the holdout split, with paired seeds, and tabulate the effect.

Each *arm* is one command: either the airbench94_muon port (``airbench94_muon.py``) with a
set of its knob flags, or ``cifarlab train --preset fast`` with config flags (and, where no
flag exists, a config file). Every arm but a chain's first differs from its *parent* in
exactly one thing, which its description names. Two chains meet in the middle:

    R0 (published) -> R1 -> ... -> R5   the reference, moved step by step to fast's settings
    F0 (shipped)   -> F1 -> ... -> F4   fast, moved step by step to the reference's settings

and *bridges* compare a reference arm with a cifarlab arm at matched settings (R5 vs F3
at batch 1024, R4 vs F4 at batch 2000; both 8 epochs), where what remains is what no
knob expresses (see BRIDGES; two more pairs there span steps: what fast's compute saving
costs, F0 vs F2, and everything but compute, R0 vs F2).

Every arm runs the same seeds (0..N-1), all with ``--holdout 5000`` on the same data;
each finished run appends one JSON line (arm, seed, holdout accuracy with and without
TTA, train and wall seconds, machine, precision) to ``--out``. Runs already there (same
arm, seed, flags and data) are skipped, so a later session, on this machine or a faster
one, continues where the last stopped: pass it the same ``--out``.

    python benchmarks/reference/diagnose.py --list
    python benchmarks/reference/diagnose.py --arms R0,F0 --seeds 2 --dry-run
    python benchmarks/reference/diagnose.py --seeds 2 --out benchmarks/results/DATE-diagnose/diagnose.jsonl
    python benchmarks/reference/diagnose.py --table --out benchmarks/results/DATE-diagnose/diagnose.jsonl

``--table`` prints a Markdown table: per arm the per-seed accuracies, mean, spread
(min-max), the paired difference to its parent (mean of the per-seed differences, and
each), and ``finding`` only where |mean paired difference| exceeds the seed spread of both
arms (needs 2+ paired seeds); then the bridges the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT = HERE / "airbench94_muon.py"
sys.path.insert(0, str(HERE.parent))  # benchmarks/, for versus.py
import versus  # noqa: E402  (its run, machine and metrics helpers)

# Flags every smoke-test run gets last (so they win over the arm's own): tiny data only.
SMOKE_FLAGS = ["--epochs", "1", "--batch-size", "100"]
DEFAULT_OUT = "benchmarks/results/{date}-diagnose/diagnose.jsonl"


@dataclass(frozen=True)
class Arm:
    """One configuration. ``flags`` and ``config`` are the change from ``parent``."""

    name: str
    side: str  # "reference" (the port) or "cifarlab" (cifarlab train --preset fast)
    parent: str | None
    what: str  # the one difference from the parent, short (the table's column)
    why: str  # the longer description --list prints
    flags: dict = field(default_factory=dict)  # flag -> value (None: a switch)
    config: dict = field(default_factory=dict)  # config keys no flag sets (cifarlab arms)
    minutes: float = 17.5  # estimated minutes per run on the 2-vCPU AVX512-BF16 machine


# fast's head/bias LR at batch 2000, from its own rule (fast.toml): 0.67 * 2000 * (9/256)^2,
# and the weight decay that makes the per-step decay lr * wd = 2e-6 * 2000 (airbench's).
F_LR_2000 = round(0.67 * 2000 * (9 / 256) ** 2, 4)
F_WD_2000 = round(2e-6 * 2000 / F_LR_2000, 7)

ARMS = [
    Arm("R0", "reference", None, "published recipe",
        "airbench94_muon as published: batch 2000, 8 epochs, published normalisation constants, "
        "Newton-Schulz 3 steps, whitening bias trained 3 epochs, reflect-padded TTA translations"),
    Arm("R1", "reference", "R0", "TTA pad: zeros",
        "TTA translations padded with zeros (cifarlab's engine.predict_logits until 2026-12-03, "
        "reflection since: tta_pad.py measures the same change on cifarlab checkpoints) instead of reflection",
        {"--tta-pad": "constant"}),
    Arm("R2", "reference", "R1", "norm stats: the data's",
        "normalise with the loaded data's own mean/std (cifarlab's) instead of the official "
        "CIFAR-10 constants (the JPEG copy's differ in the third digit)",
        {"--norm-stats": "data"}),
    Arm("R3", "reference", "R2", "Newton-Schulz: 5 steps",
        "5 quintic Newton-Schulz steps per Muon update (cifarlab's optim.NS_STEPS) instead of 3",
        {"--ns-steps": "5"}),
    Arm("R4", "reference", "R3", "whitening bias: trained all run",
        "whitening bias trained for the whole run on the common LR schedule (cifarlab keeps it in "
        "the bias group throughout) instead of for 3 epochs on its own schedule",
        {"--whiten-bias-epochs": "8"}),
    Arm("R5", "reference", "R4", "batch 1024 (fast's rescaling)",
        "batch 1024 as fast, with fast's rescaling: summed-loss LRs kept (= mean-loss LRs x "
        "1024/2000), weight decay per example kept (2e-6), Muon LR and momenta kept",
        {"--batch-size": "1024"}, minutes=17.0),
    Arm("F0", "cifarlab", None, "fast as shipped",
        "cifarlab train --preset fast as shipped: 7 epochs, the first 43% at 24 px (progressive "
        "resizing), batch 1024, 1% flat LR start", minutes=11.5),
    Arm("F1", "cifarlab", "F0", "no progressive resizing",
        "all 7 epochs at 32 px (--progressive-resize none)",
        {"--progressive-resize": "none"}, minutes=13.0),
    Arm("F2", "cifarlab", "F1", "8 epochs",
        "8 epochs, the reference's (equal epochs from here on)",
        {"--epochs": "8"}, minutes=15.0),
    Arm("F3", "cifarlab", "F2", "LR decays from step 1",
        "LR decays linearly from the first step, as the reference's (One-Cycle pct_start 1e-6) "
        "instead of after a 1% flat start; a config file sets it (no flag)",
        config={"pct_start": 1e-6}, minutes=15.0),
    Arm("F4", "cifarlab", "F3", "batch 2000 (LRs rescaled)",
        f"batch 2000, the reference's, with fast's LR rule undone: head lr 0.67*2000*(9/256)^2 = "
        f"{F_LR_2000} (biases 64x), weight decay {F_WD_2000} (per-step decay 2e-6*2000)",
        {"--batch-size": "2000", "--lr": str(F_LR_2000), "--weight-decay": str(F_WD_2000)}, minutes=17.5),
    Arm("F5", "cifarlab", "F0", "Newton-Schulz: 3 steps",
        "fast as shipped with 3 quintic Newton-Schulz steps per Muon update (the reference's) "
        "instead of 5; a config file sets it (muon_ns_steps)",
        config={"muon_ns_steps": 3}, minutes=11.5),
    # Beyond the reference: two zero-cost changes from the 2025 record that followed it
    # (hiverge/cifar10-speedrun: 94% in 7.63 epochs at batch 1536 instead of 8 at 2000).
    Arm("F7", "cifarlab", "F0", "colour jitter",
        "fast as shipped plus a per-image brightness shift (+-0.14) and contrast scale (+-0.13) "
        "in normalised units, the 2025 record's values; a config file sets it (augment)",
        config={"augment": "translate:2,flip:alt,brightness:0.14,contrast:0.13"}, minutes=11.5),
    Arm("F8", "cifarlab", "F7", "label smoothing 0.09",
        "label smoothing 0.09 (the 2025 record's, used with its colour jitter) instead of "
        "airbench94_muon's 0.2; a config file sets it",
        config={"label_smoothing": 0.09}, minutes=11.5),
]
ARMS_BY_NAME = {a.name: a for a in ARMS}

# (reference arm, cifarlab arm, what still differs): matched on every knob, so what is left
# is implementation that no flag expresses (LEFT_OVER, the table's footnote).
LEFT_OVER = ("whitening fitted on the centred patch covariance with bias = -filters.mean (cifarlab) vs the "
             "uncentred one with a random bias init (reference); logits x1/9 with a mean loss vs x1/256 with "
             "a summed loss (the LRs rescaled to match, so equal up to the head init's 2.6%); the whitening "
             "eigendecomposition in fp64 vs fp32; under bf16 the port rounds the normalised images to bf16 "
             "before augmenting, cifarlab at the first conv; at batch 1024 fast decays head and biases "
             "by 0.00200 per step, the reference by 2e-6*1024 = 0.00205")
BRIDGES = [
    ("R5", "F3", "implementation only (batch 1024, 8 epochs)"),
    ("R4", "F4", "implementation only (batch 2000, 8 epochs)"),
    ("R0", "F0", "everything: as published vs as shipped (8 vs 7 epochs)"),
    # Within fast's chain, two steps at once: what the shipped run's compute saving costs.
    ("F0", "F2", "compute: all epochs at 32 px and 8 epochs (F1 + F2 in one step)"),
    ("R0", "F2", "everything but compute (8 epochs at 32 px each): batch, LR start, Newton-Schulz "
                 "steps, whitening bias, TTA pad, implementation"),
]


# ----------------------------------------------------------------- arms -> commands


def lineage(arm: Arm) -> list[Arm]:
    """The arm's chain from its root, root first."""
    chain = [arm]
    while chain[0].parent:
        chain.insert(0, ARMS_BY_NAME[chain[0].parent])
    return chain


def resolved(arm: Arm) -> tuple[dict, dict]:
    """The arm's own flags and config keys: every ancestor's changes, later ones winning."""
    flags, config = {}, {}
    for a in lineage(arm):
        flags.update(a.flags)
        config.update(a.config)
    return flags, config


def arm_args(arm: Arm, smoke: bool = False) -> list[str]:
    """The arm's flags as a list (no data flags, no seed); smoke-test flags last."""
    flags, _ = resolved(arm)
    out = []
    for flag, value in flags.items():
        out += [flag] if value is None else [flag, str(value)]
    return out + (SMOKE_FLAGS if smoke else [])


def config_text(config: dict) -> str:
    """A flat TOML file of ``config`` (numbers, strings, booleans: JSON spells them as TOML does)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(config.items()))


def config_file(arm: Arm, keep: Path) -> Path | None:
    """Write the arm's config file under ``keep/configs`` (None when it needs none)."""
    _, config = resolved(arm)
    if not config:
        return None
    path = keep / "configs" / f"{arm.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# diagnose.py arm {arm.name}: {arm.what}\n" + config_text(config))
    return path


def versus_args(arm: Arm, ctx: argparse.Namespace, keep: Path) -> argparse.Namespace:
    """The namespace versus.py's reference_cmd/cifarlab_cmd read, for this arm."""
    extra = arm_args(arm, ctx.smoke)
    cfg = config_file(arm, keep) if arm.side == "cifarlab" else None
    if cfg is not None:
        extra = ["--config", str(cfg), *extra]
    return argparse.Namespace(
        dataset=ctx.dataset, data=ctx.data, holdout=ctx.holdout, limit_train=ctx.limit_train,
        limit_test=ctx.limit_test, epoch_eval=False, epochs=None, batch_size=None, preset="fast",
        ref_args=shlex.join(extra) if arm.side == "reference" else "", extra=extra if arm.side == "cifarlab" else [],
    )


def command(arm: Arm, seed: int, ctx: argparse.Namespace, keep: Path) -> list[str]:
    """The arm's full command line for ``seed`` (versus.py builds it)."""
    ns = versus_args(arm, ctx, keep)
    if arm.side == "reference":
        return versus.reference_cmd(ns, seed)
    return versus.cifarlab_cmd(ns, seed, run_dir(keep, arm, seed))


def run_dir(keep: Path, arm: Arm, seed: int) -> Path:
    return keep / arm.name / f"cifarlab-seed{seed}"  # the name versus.run_cifarlab uses


def signature(arm: Arm, ctx: argparse.Namespace) -> dict:
    """What makes two runs of an arm the same measurement: its flags, config and data."""
    data = versus.data_args(ctx)
    return {"args": arm_args(arm, ctx.smoke), "config": resolved(arm)[1], "data": data}


# ----------------------------------------------------------------- checking arms


def _load_port():
    spec = importlib.util.spec_from_file_location("airbench94_muon_port", PORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_dests(args: list[str], namespace: argparse.Namespace, arm: Arm) -> None:
    """Every flag must be an exact option name (argparse would accept an abbreviation)."""
    for flag in (a for a in args if a.startswith("--")):
        if not hasattr(namespace, flag[2:].replace("-", "_")):
            raise ValueError(f"arm {arm.name}: {flag} is not an option of the {arm.side} command")


def check_arm(arm: Arm, keep: Path, data: list[str] | None = None):
    """Parse the arm's command line with the real parsers (and, for cifarlab, resolve its
    config) without running anything: the port's namespace, or cifarlab's TrainConfig.
    Raises ValueError naming the arm (cifarlab's CifarlabError for a bad config value)."""
    data = data or ["--dataset", "synthetic", "--holdout", "300"]
    args = arm_args(arm)
    try:
        if arm.side == "reference":
            ns = result = _load_port().parse_args([*data, "--seed", "0", *args])
        else:
            ns, result = _check_cifarlab(arm, keep, data, args)
    except SystemExit as exc:
        raise ValueError(f"arm {arm.name}: its flags do not parse: {shlex.join(args)}") from exc
    _check_dests(args, ns, arm)
    return result


def _check_cifarlab(arm: Arm, keep: Path, data: list[str], args: list[str]):
    from cifarlab import cli
    from cifarlab.config import resolve_config
    from cifarlab.data import ResizeSchedule

    cfg_path = config_file(arm, keep)
    extra = ["--config", str(cfg_path)] if cfg_path else []
    ns = cli.build_parser().parse_args(["train", "--preset", "fast", *data, "--seed", "0", *extra, *args])
    cfg = resolve_config(preset=ns.preset, config_file=ns.config, overrides=cli._overrides(ns))
    ResizeSchedule.parse(cfg.progressive_resize)
    return ns, cfg


# ----------------------------------------------------------------- results file


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of ``path`` ([] when it does not exist; blank lines skipped)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ok(row: dict) -> bool:
    return not row.get("error") and row.get("acc_tta") is not None


def _same(row: dict, sig: dict) -> bool:
    return all(row.get(k) == v for k, v in sig.items())


def done(rows: list[dict], arm: Arm, seed: int, sig: dict) -> bool:
    """Whether ``rows`` hold a successful run of this arm, seed and signature."""
    return any(_ok(r) and r["arm"] == arm.name and r["seed"] == seed and _same(r, sig) for r in rows)


def todo(rows: list[dict], arms: list[Arm], seeds: list[int], ctx) -> list[tuple[Arm, int]]:
    """The (arm, seed) runs still to do, arm by arm (an arm's seeds together, so pairs complete)."""
    return [(a, s) for a in arms for s in seeds if not done(rows, a, s, signature(a, ctx))]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------- running


def run_arm(arm: Arm, seed: int, ctx, keep: Path, env: dict) -> dict:
    """Run one arm for one seed; the result row (accuracies, seconds, precision)."""
    ns = versus_args(arm, ctx, keep)
    arm_keep = keep / arm.name
    arm_keep.mkdir(parents=True, exist_ok=True)
    if arm.side == "reference":
        r = versus.run_reference(ns, seed, env, arm_keep)
        return {"acc": r["acc"], "acc_tta": r["acc_tta"], "train_s": r["per_epoch"][-1]["train_s_cum"],
                "train_s_with_whiten": r["train_s"], "wall_s": r["wall_s"], "epochs": r["epochs"],
                "precision": r["precision"]}
    stale = run_dir(keep, arm, seed)
    if stale.exists():  # an interrupted earlier attempt: its row was never written
        versus.log(f"diagnose: removing the unfinished {stale}")
        shutil.rmtree(stale)
    r = versus.run_cifarlab(ns, seed, env, arm_keep)
    row = {"acc": None, "acc_tta": r["acc"], "train_s": r["train_s"], "wall_s": r["wall_s"],
           "epochs": r["epochs"], "precision": r["precision"], "gemm_convs": r["gemm_convs"], "run_dir": r["run_dir"]}
    if ctx.plain_eval:
        try:
            row["acc"], row["plain_eval_n"], row["plain_eval_wall_s"] = plain_accuracy(Path(r["run_dir"]), env)
        except (SystemExit, ValueError, KeyError, IndexError) as exc:  # keep the run; lose only this
            row["plain_eval_error"] = f"{type(exc).__name__}: {exc}"
    return row


def plain_accuracy(run: Path, env: dict) -> tuple[float, int, float]:
    """The run's final accuracy without TTA (cifarlab evaluates only with it after the last
    epoch): ``cifarlab evaluate --tta none`` on its last checkpoint, same holdout (and its size)."""
    cmd = [sys.executable, "-m", "cifarlab", "evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
           "--tta", "none", "--json"]
    stdout, wall = versus.timed(cmd, env, capture=True)
    metrics = json.loads(stdout.strip().splitlines()[-1])
    return round(metrics["accuracy"], 5), metrics["n"], round(wall, 2)


def run_all(ctx, arms: list[Arm], seeds: list[int]) -> int:
    """Run every (arm, seed) not yet in ``ctx.out``; one row each, errors included."""
    out, keep = Path(ctx.out), Path(ctx.keep)
    env = dict(os.environ)
    if ctx.threads:
        env.update(OMP_NUM_THREADS=str(ctx.threads), MKL_NUM_THREADS=str(ctx.threads))
    for arm in arms:  # a typo in an arm should stop us now, not hours in
        check_arm(arm, keep, versus.data_args(ctx))
    plan = todo(read_rows(out), arms, seeds, ctx)
    versus.log(f"diagnose: {len(plan)} runs to do, appending to {out} (pass --out {out} to continue later)")
    if not plan:
        return 0
    versus.warm_cache(argparse.Namespace(warm=ctx.warm, dataset=ctx.dataset, data=ctx.data), env)
    machine = versus.machine_info(env)
    failed = 0
    for arm, seed in plan:
        base = {"arm": arm.name, "side": arm.side, "parent": arm.parent, "what": arm.what, "seed": seed,
                **signature(arm, ctx), "smoke": ctx.smoke, "command": shlex.join(command(arm, seed, ctx, keep))}
        start = time.time()
        try:
            result = run_arm(arm, seed, ctx, keep, env)
        except (SystemExit, ValueError, KeyError, IndexError, OSError) as exc:  # record it, go on
            failed += 1  # (versus.timed raises SystemExit when the command fails)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        append_row(out, {**base, **result, "machine": machine, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "elapsed_s": round(time.time() - start, 1)})
        versus.log(f"diagnose: {arm.name} seed {seed}: " + json.dumps(result))
    return 1 if failed else 0


# ----------------------------------------------------------------- the table


def scores(rows: list[dict], arm: Arm, sig: dict, metric: str) -> dict[int, dict]:
    """{seed: row} of the arm's successful runs with this signature (the latest per seed)."""
    out = {}
    for r in rows:
        if r.get("arm") == arm.name and _ok(r) and _same(r, sig) and r.get(metric) is not None:
            out[r["seed"]] = r
    return dict(sorted(out.items()))


def stats(values: dict[int, float]) -> dict | None:
    """Mean, min, max and spread (max - min) of per-seed values; None when there are none."""
    if not values:
        return None
    v = list(values.values())
    return {"n": len(v), "mean": statistics.fmean(v), "lo": min(v), "hi": max(v), "spread": max(v) - min(v)}


def paired(child: dict[int, float], parent: dict[int, float]) -> dict | None:
    """Per-seed differences child - parent over the seeds both have, and their mean."""
    seeds = sorted(set(child) & set(parent))
    if not seeds:
        return None
    diffs = {s: child[s] - parent[s] for s in seeds}
    return {"diffs": diffs, "mean": statistics.fmean(diffs.values()), "n": len(seeds)}


def finding(diff: dict | None, a: dict | None, b: dict | None) -> bool | None:
    """True when |mean paired difference| exceeds the seed spread of both arms; None when
    that cannot be judged (no pair, or fewer than 2 paired seeds: no spread to beat)."""
    if diff is None or a is None or b is None or diff["n"] < 2 or a["n"] < 2 or b["n"] < 2:
        return None
    return abs(diff["mean"]) > max(a["spread"], b["spread"])


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def compare_cells(child: dict[int, float], parent: dict[int, float] | None) -> list[str]:
    """The cells: per seed, mean, spread, paired difference, finding."""
    s = stats(child)
    if s is None:
        return ["not run", "", "", "", ""]
    per_seed = ", ".join(f"{k}: {_pct(v)}" for k, v in child.items())
    spread = f"{_pct(s['lo'])}-{_pct(s['hi'])} ({100 * s['spread']:.2f})"
    d = paired(child, parent) if parent else None
    diff = "" if d is None else f"{_pp(d['mean'])} ({', '.join(_pp(v) for v in d['diffs'].values())})"
    verdict = finding(d, s, stats(parent) if parent else None)
    word = "" if parent is None else {True: "**yes**", False: "no", None: "n/a"}[verdict]
    return [per_seed, _pct(s["mean"]), spread, diff, word]


def _values(found: dict[int, dict], metric: str) -> dict[int, float]:
    return {seed: row[metric] for seed, row in found.items()}


def _extras(found: dict[int, dict], other: str) -> list[str]:
    plain = [r[other] for r in found.values() if r.get(other) is not None]
    secs = [r["train_s"] for r in found.values() if r.get("train_s") is not None]
    prec = sorted({str(r.get("precision")) for r in found.values()})
    return [_pct(statistics.fmean(plain)) if plain else "", f"{statistics.fmean(secs):.0f}" if secs else "", "/".join(prec)]


def table(rows: list[dict], ctx, metric: str = "acc_tta") -> str:
    """The Markdown tables: arms against their parents, then the bridges."""
    other = "acc" if metric == "acc_tta" else "acc_tta"
    other_label = {"acc": "no-TTA", "acc_tta": "TTA"}[other]
    found = {a.name: scores(rows, a, signature(a, ctx), metric) for a in ARMS}
    vals = {name: _values(f, metric) for name, f in found.items()}
    head = (f"| arm | vs | what changed | {metric} per seed (%) | mean | spread: min-max (pp) | "
            f"paired diff vs parent, pp: mean (per seed) | finding | {other_label} mean (%) | train s | precision |")
    lines = [head, "|" + "---|" * 11]
    for a in ARMS:
        cells = compare_cells(vals[a.name], vals[a.parent] if a.parent else None)
        lines.append("| " + " | ".join([a.name, a.parent or "", a.what, *cells, *_extras(found[a.name], other)]) + " |")
    lines += ["", f"Bridges and spans (second arm minus first, {metric}):", "",
              "| first | second | still differs | second per seed (%) | mean | spread | paired diff, pp | finding |",
              "|" + "---|" * 8]
    for ref, lab, left in BRIDGES:
        cells = compare_cells(vals[lab], vals[ref])
        lines.append("| " + " | ".join([ref, lab, left, *cells]) + " |")
    return "\n".join(lines + _notes(rows, found, ctx))


def _notes(rows: list[dict], found: dict, ctx) -> list[str]:
    """Footnotes: mixed precision within a comparison, rows of other flags/data ignored."""
    notes = [""]
    used = {id(r) for f in found.values() for r in f.values()}
    ignored = sum(1 for r in rows if _ok(r) and id(r) not in used)
    pairs = [(a.name, a.parent) for a in ARMS if a.parent] + [(r, f) for r, f, _ in BRIDGES]
    for x, y in pairs:
        px = {r.get("precision") for r in found[x].values()} | {r.get("precision") for r in found[y].values()}
        if len(px) > 1:
            notes.append(f"- {x} vs {y} mixes precisions {sorted(map(str, px))}: compare with care.")
    if ignored:
        notes.append(f"- {ignored} successful rows ignored: other flags, data or an older arm definition "
                     "(or a seed's earlier repeat).")
    cpus = sorted({r.get("machine", {}).get("cpu", "?") for f in found.values() for r in f.values()})
    notes.append(f"- implementation only = {LEFT_OVER}.")
    notes.append(f"- Machines: {'; '.join(cpus) or 'none'}. finding = |mean paired diff| > seed spread "
                 "of both arms, with 2+ paired seeds.")
    return notes


# ----------------------------------------------------------------- command line


def list_text(arms: list[Arm], seeds: int) -> str:
    """--list: each arm, its parent, what changed, its flags; the estimated cost."""
    lines = []
    for a in arms:
        flags, config = resolved(a)
        lines.append(f"{a.name}  ({a.side}, vs {a.parent or '-'}, ~{a.minutes:g} min/run)  {a.what}")
        lines.append(f"    {a.why}")
        lines.append(f"    flags: {shlex.join(arm_args(a)) or '(none)'}" + (f"   config: {json.dumps(config)}" if config else ""))
    total = sum(a.minutes for a in arms) * seeds
    lines.append("\nbridges: " + "; ".join(f"{r} vs {f}" for r, f, _ in BRIDGES))
    lines.append(f"estimated cost: {len(arms)} arms x {seeds} seeds, ~{total:.0f} min (~{total / 60:.1f} h) "
                 "on the 2-vCPU AVX512-BF16 machine")
    return "\n".join(lines)


def pick_arms(text: str) -> list[Arm]:
    if text == "all":
        return list(ARMS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS_BY_NAME]
    if unknown:
        raise SystemExit(f"diagnose: error: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS_BY_NAME)}")
    return [ARMS_BY_NAME[n] for n in names]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="all", help="comma-separated arms, or all (default); --list shows them")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 for every arm (default 2)")
    p.add_argument("--out", help="JSON lines to append to and resume from "
                   f"(default: {DEFAULT_OUT.format(date='DATE')}, DATE today)")
    p.add_argument("--keep", default="runs/diagnose",
                   help="cifarlab run dirs, reference JSON, config files (default: %(default)s)")
    p.add_argument("--data", default="../shared/datasets/cifar10-jpeg", help="data root (default: %(default)s)")
    p.add_argument("--dataset", default="imagefolder", choices=("imagefolder", "cifar10", "synthetic"))
    p.add_argument("--holdout", type=int, default=5000, help="held-out training images evaluated on (default 5000; 0: train on all 50000, evaluate on the test split)")
    p.add_argument("--limit-train", type=int, help="class-balanced subset (smoke tests)")
    p.add_argument("--limit-test", type=int, help="class-balanced subset (smoke tests)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: inherited)")
    p.add_argument("--smoke", action="store_true", help=f"append {shlex.join(SMOKE_FLAGS)} to every arm (tiny data; needs --out)")
    p.add_argument("--no-plain-eval", dest="plain_eval", action="store_false",
                   help="skip the no-TTA evaluation of cifarlab runs (a `cifarlab evaluate` each)")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip loading the data once first")
    p.add_argument("--metric", default="acc_tta", choices=("acc_tta", "acc"), help="--table: the accuracy compared")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the arms and the estimated cost")
    mode.add_argument("--dry-run", action="store_true", help="print the commands still to run")
    mode.add_argument("--table", action="store_true", help="print the Markdown table of --out")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.smoke and args.out is None:
        p.error("--smoke needs an explicit --out (keep smoke rows out of the real results)")
    args.out = args.out or DEFAULT_OUT.format(date=time.strftime("%Y-%m-%d"))
    return args


def main(argv=None) -> int:
    ctx = parse_args(argv)
    arms, seeds = pick_arms(ctx.arms), list(range(ctx.seeds))
    if ctx.list:
        print(list_text(arms, ctx.seeds))
    elif ctx.table:
        print(table(read_rows(Path(ctx.out)), ctx, ctx.metric))
    elif ctx.dry_run:
        plan = todo(read_rows(Path(ctx.out)), arms, seeds, ctx)
        for arm, seed in plan:
            print(f"# {arm.name} seed {seed}: {arm.what}\n{shlex.join(command(arm, seed, ctx, Path(ctx.keep)))}")
        print(f"# {len(plan)} runs to do, ~{sum(a.minutes for a, _ in plan):.0f} min")
    else:
        return run_all(ctx, arms, seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
