"""``cifarlab train --seeds 0,1,2``: one config trained once per seed, and how far the seeds spread.

Layout of ``OUT`` (default ``runs/<preset>-<UTC timestamp>``, as for a single run)::

    seed-0/ seed-1/ ...   one ordinary run directory per seed (its own report unless --no-report)
    summary.json          per-seed final and best accuracy, and their mean/std/min/max
    compare.html          ``cifarlab report --compare`` of the seed runs, with the mean ± std row

The seeds train one after the other in this process (under torchrun: every rank trains
each seed together, rank 0 writes). With ``--resume`` every seed run that is not finished
continues, finished ones are skipped, and seeds never started train from scratch with the
stored config of the others.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from cifarlab import distributed
from cifarlab.config import TrainConfig
from cifarlab.errors import CifarlabError, TrainingInterrupted, TrainingStopped
from cifarlab.rundir import RunDir, default_run_dir

SUMMARY_FILE = "summary.json"
COMPARE_FILE = "compare.html"


def parse_seeds(text: str, seed_flag: int | None = None) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a one-line error for anything else, a seed listed twice,
    or a ``--seed`` given too (``seed_flag``)."""
    if seed_flag is not None:
        raise CifarlabError("give either --seed or --seeds, not both")
    items = [t.strip() for t in str(text).split(",")]
    try:
        seeds = [int(t) for t in items]
    except ValueError:
        raise CifarlabError(f"--seeds takes a comma-separated list of integer seeds, e.g. 0,1,2; got {text!r}") from None
    negative = [s for s in seeds if s < 0]
    if negative:
        raise CifarlabError(f"--seeds: seeds must be >= 0; got {negative[0]}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise CifarlabError(f"--seeds: seed {twice[0]} is listed twice; each seed trains once")
    return seeds


def seed_dir(out: str | Path, seed: int) -> Path:
    """Where seed ``seed`` of a seeds run in ``out`` trains: ``out/seed-<seed>``."""
    return Path(out) / f"seed-{seed}"


@dataclass
class SeedsResult:
    """What :func:`train_seeds` returns (``summary``/``compare`` None on ranks other than 0)."""

    out: Path
    summary: dict[str, Any] | None
    compare: Path | None


def train_seeds(
    cfg: TrainConfig,
    seeds: Sequence[int],
    *,
    resume: bool = False,
    resume_overrides: Mapping[str, Any] | None = None,
    on_finish: Callable[[Any], None] | None = None,
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> SeedsResult:
    """Train ``cfg`` once per seed into ``OUT/seed-K/`` (OUT = ``cfg.out`` or the default run
    directory), then write ``OUT/summary.json`` and, for two or more seeds, ``OUT/compare.html``.

    ``on_finish``, ``progress`` and ``stream`` go to each :func:`cifarlab.train.fit`;
    ``resume``/``resume_overrides`` as for ``fit``, per seed (see the module docstring).
    A seed that is interrupted or stops training stops the whole sequence; its message
    says how to continue all seeds.
    """
    from cifarlab.train import fit

    if not seeds:
        raise CifarlabError("--seeds needs at least one seed")
    out = _seeds_root(cfg, resume)
    plan = _plan(cfg, seeds, out, resume, resume_overrides)
    say = _say(stream)
    for i, (seed, run_cfg, how) in enumerate(plan):
        where = f"seed {seed} ({i + 1}/{len(plan)}) in {seed_dir(out, seed)}"
        if how == "done":
            say(f"seeds: {where} already finished; skipped")
            continue
        say(f"seeds: {where}" + (", resuming" if how == "resume" else ""))
        try:
            fit(run_cfg, resume=how == "resume", resume_overrides=resume_overrides if how == "resume" else None,
                progress=progress, stream=stream, on_finish=on_finish)
        except (TrainingInterrupted, TrainingStopped) as exc:
            raise _for_all_seeds(exc, seed, out, seeds) from None
    if not _rank0():
        distributed.barrier()  # leave with rank 0 once it has written the summary (see fit)
        return SeedsResult(out, None, None)
    summary = write_summary(out, seeds)
    compare = _write_compare(out, seeds, say)
    say(_summary_line(summary, out, compare))
    distributed.barrier()
    return SeedsResult(out, summary, compare)


def _rank0() -> bool:
    # The launcher's RANK, not distributed.is_main(): the first message comes before fit()
    # joins the process group.
    return os.environ.get("RANK", "0") in ("", "0")


def _say(stream: TextIO | None) -> Callable[[str], None]:
    def say(message: str) -> None:
        if _rank0():
            print(message, file=stream if stream is not None else sys.stdout, flush=True)

    return say


def _seeds_root(cfg: TrainConfig, resume: bool) -> Path:
    """OUT: ``--out``, the newest seeds run to resume, or a new default run directory."""
    if cfg.out:
        return Path(cfg.out)
    if not resume:
        return default_run_dir(cfg)
    found = sorted(Path("runs").glob(f"{cfg.preset or cfg.model}-*/seed-*/checkpoints/last.pt"))
    if not found:
        raise CifarlabError(f"--resume --seeds: no seeds run to resume in runs/{cfg.preset or cfg.model}-*; pass its --out")
    return found[-1].parents[2]


def _plan(cfg: TrainConfig, seeds: Sequence[int], out: Path, resume: bool, overrides: Mapping[str, Any] | None):
    """(seed, config, "train" | "resume" | "done") per seed, every problem found before any training."""
    started = [s for s in seeds if RunDir(seed_dir(out, s)).holds_run()]
    command = f"cifarlab train --out {shlex.quote(str(out))} --seeds {','.join(map(str, seeds))}"
    if not resume:
        if started:
            raise CifarlabError(
                f"{seed_dir(out, started[0])} already holds a run; continue the seeds with `{command} --resume`, "
                "or pass another --out"
            )
        return [(s, replace(cfg, seed=s, out=str(seed_dir(out, s))), "train") for s in seeds]
    if not started:
        raise CifarlabError(f"--resume: no seed run to resume in {out} (expected {seed_dir(out, seeds[0])}/checkpoints/last.pt)")
    stored = {s: _stored(seed_dir(out, s)) for s in started}
    plan = []
    for s in seeds:
        if s in stored:
            ckpt_epoch, stored_cfg = stored[s]
            epochs = cfg.epochs if overrides and "epochs" in overrides else stored_cfg.epochs
            done = ckpt_epoch >= epochs and RunDir(seed_dir(out, s)).weights.is_file()
            plan.append((s, replace(cfg, seed=s, out=str(seed_dir(out, s))), "done" if done else "resume"))
        else:
            # Never started: the others' stored config with this seed, and only the changes
            # --resume allows (a refused flag fails here, before anything trains).
            from cifarlab.resume import resume_config

            model = stored[started[0]][1]
            fresh = resume_config(model, cfg, overrides, seed_dir(out, s))
            plan.append((s, replace(fresh, seed=s), "train"))
    return plan


def _stored(run: Path) -> tuple[int, TrainConfig]:
    """A seed run's completed epochs and stored config, from its last checkpoint."""
    from cifarlab.checkpoint import TrainingCheckpoint, read_checkpoint
    from cifarlab.config import config_from_dict

    ckpt = TrainingCheckpoint.from_dict(read_checkpoint(RunDir(run).last))
    return ckpt.epoch, config_from_dict({k: v for k, v in ckpt.config.items() if v is not None})


def _for_all_seeds(exc: CifarlabError, seed: int, out: Path, seeds: Sequence[int]) -> CifarlabError:
    """The stop's message for seed ``seed``, saying how to continue every seed."""
    from cifarlab.rundir import resume_command

    again = f"{resume_command(out, distributed.world_size())} --seeds {','.join(map(str, seeds))}"
    message = f"seed {seed}: {exc}"
    if isinstance(exc, TrainingInterrupted):
        return TrainingInterrupted(f"{message} To continue all seeds: {again}", exc.signum)
    return TrainingStopped(f"{message} (the seeds after it were not trained)")


def _seed_row(seed: int, run: Path) -> dict[str, Any]:
    """One seed's final and best accuracy, from its metrics.jsonl."""
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    evaluated = [r for r in rows if r.get("test_acc") is not None]
    best = max(evaluated, key=lambda r: r["test_acc"]) if evaluated else None
    return {
        "seed": seed,
        "dir": run.name,  # relative to OUT: the folder can move
        "final_acc": rows[-1]["test_acc"] if rows else None,
        "best_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "epochs": len(rows),
        "seconds": rows[-1].get("elapsed") if rows else None,
        "eval_split": rows[-1].get("eval_split", "test") if rows else "test",
    }


def write_summary(out: str | Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Write ``out/summary.json`` over the seed runs in ``out``; return it.

    ``final_acc``/``best_acc`` hold mean, std, min and max over the seeds; std is the
    sample standard deviation (n - 1), null with a single seed.
    """
    from cifarlab.report.compare import spread

    out = Path(out)
    runs = [_seed_row(s, seed_dir(out, s)) for s in seeds]
    summary = {
        "seeds": list(seeds),
        "n": len(runs),
        "eval_split": runs[0]["eval_split"],
        "std": "sample standard deviation (n - 1); null with one seed",
        "final_acc": spread([r["final_acc"] for r in runs]),
        "best_acc": spread([r["best_acc"] for r in runs]),
        "runs": runs,
    }
    try:
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise CifarlabError(f"cannot write {out / SUMMARY_FILE}: {exc.strerror or exc}; the seed runs are saved") from None
    return summary


def _write_compare(out: Path, seeds: Sequence[int], say: Callable[[str], None]) -> Path | None:
    """``out/compare.html`` over the seed runs (two or more); a failure is only reported."""
    if len(seeds) < 2:
        return None
    from cifarlab.report.compare import compare_runs

    dirs = [seed_dir(out, s) for s in seeds]
    try:
        return compare_runs(dirs, out / COMPARE_FILE)
    except Exception as exc:  # noqa: BLE001 - the runs and summary.json are written; the page can be redone
        retry = " ".join(shlex.quote(str(d)) for d in dirs)
        say(f"warning: the comparison page could not be written ({type(exc).__name__}: {exc}); "
            f"retry with: cifarlab report --compare {retry} --out {shlex.quote(str(out / COMPARE_FILE))}")
        return None


def _summary_line(summary: Mapping[str, Any], out: Path, compare: Path | None) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2%}"

    parts = []
    for key, label in (("final_acc", "final"), ("best_acc", "best")):
        st = summary[key]
        parts.append(f"{label} {pct(st['mean'])} ± {pct(st['std'])} (min {pct(st['min'])}, max {pct(st['max'])})")
    split = summary["eval_split"]
    return (
        f"seeds {','.join(map(str, summary['seeds']))}: {split} accuracy " + "; ".join(parts)
        + f" | {out / SUMMARY_FILE}" + (f", {compare}" if compare else "")
    )
