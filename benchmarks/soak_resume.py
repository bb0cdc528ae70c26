"""Randomized soak test of exact resume: kill a tiny training run at random points, resume
it, and check that the final weights are bitwise equal to an uninterrupted run.

Each trial draws one fault and injects it into a fresh run of the same config:

    kill-step     SIGKILL right after a random training step
    kill-save     SIGKILL in the middle of a random checkpoint write (temp file written,
                  not yet renamed over the previous checkpoint)
    kill-timer    SIGKILL from outside at a random wall-clock moment (any phase at all)
    int-step      SIGINT after a random step (graceful: save, exit 130)
    int-int       SIGINT after a random step and a second one during the save it triggers
    term-step     SIGTERM after a random step (graceful: save, exit 143)

then resumes with ``cifarlab train --out RUN --resume`` (starting over when the fault
hit before the first checkpoint existed) and compares weights, optimizer state and
per-epoch test accuracy with the reference run. Prints one JSON object as its last line.

    python benchmarks/soak_resume.py --trials 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = [
    "--preset", "fast", "--dataset", "synthetic", "--num-classes", "4", "--model", "fast", "--epochs", "2",
    "--batch-size", "32", "--lr", "0.2", "--limit-train", "256", "--limit-test", "128", "--device", "cpu",
    "--seed", "1", "--tta", "none", "--save-every-steps", "3", "--no-report",
]
STEPS = 16  # 256 / 32 * 2 epochs
# Checkpoint writes of an uninterrupted run of CONFIG: steps 3, 6, 8 (last + best), 11, 14, 16 (last [+ best]).
SAVES = 8
KINDS = ("kill-step", "kill-save", "kill-timer", "int-step", "int-int", "term-step")


def cifarlab(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarlab", *args], capture_output=True, text=True, env=env, timeout=timeout)


def same_run(a: Path, b: Path) -> tuple[bool, str]:
    import torch

    from cifarlab.checkpoint import read_checkpoint

    x = read_checkpoint(a / "checkpoints" / "last.pt")
    y = read_checkpoint(b / "checkpoints" / "last.pt")
    if (x["epoch"], x["step"]) != (y["epoch"], y["step"]):
        return False, f"ended at {y['epoch']}/{y['step']}, expected {x['epoch']}/{x['step']}"
    for k, v in x["state_dict"].items():
        if not torch.equal(v, y["state_dict"][k]):
            return False, f"weights differ at {k}"
    for i, state in x["optimizer"]["state"].items():
        for k, v in state.items():
            if not torch.equal(v, y["optimizer"]["state"][i][k]):
                return False, f"optimizer state {i}.{k} differs"
    if [r["test_acc"] for r in x["history"]] != [r["test_acc"] for r in y["history"]]:
        return False, "per-epoch test accuracy differs"
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    if [r["epoch"] for r in rows] != [r["epoch"] for r in x["history"]]:
        return False, f"metrics.jsonl epochs {[r['epoch'] for r in rows]}"
    return True, ""


def run_with_timer_kill(out: Path, env: dict[str, str], delay: float) -> int:
    """Start a run and SIGKILL it ``delay`` seconds after its first checkpoint appears."""
    child = subprocess.Popen([sys.executable, "-m", "cifarlab", "train", *CONFIG, "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while child.poll() is None and not (out / "checkpoints" / "last.pt").exists():
            time.sleep(0.005)
        deadline = time.monotonic() + delay
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()


def trial(kind: str, rng: random.Random, reference: Path, work: Path, env: dict[str, str], train_seconds: float) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    info: dict = {"kind": kind}
    start = time.perf_counter()
    if kind == "kill-timer":
        info["delay_s"] = round(rng.uniform(0, train_seconds), 3)
        code = run_with_timer_kill(out, env, info["delay_s"])
    else:
        if kind == "kill-save":
            info["save"] = rng.randrange(1, SAVES + 1)
            fault = f"kill@save={info['save']}"
        else:
            info["step"] = rng.randrange(1, STEPS)
            action = {"kill-step": "kill", "int-step": "int", "int-int": "int", "term-step": "term"}[kind]
            fault = f"{action}@step={info['step']}"
            if kind == "int-int":
                # the save the first SIGINT triggers is the first one at or after its step
                saves_before = sum(1 for s in (3, 6, 8, 8, 11, 14) if s < info["step"])
                fault += f",int@save={saves_before + 1}"
        info["fault"] = fault
        code = cifarlab(["train", *CONFIG, "--out", str(out)], dict(env, CIFARLAB_FAULT=fault)).returncode
    info["exit"] = code
    resumable = (out / "checkpoints" / "last.pt").exists()
    info["resumed_from_step"] = None
    if code != 0:
        if resumable:
            from cifarlab.checkpoint import read_checkpoint

            info["resumed_from_step"] = int(read_checkpoint(out / "checkpoints" / "last.pt")["step"])
            proc = cifarlab(["train", "--out", str(out), "--resume", "--no-report"], env)
        else:  # died before its first checkpoint: all a user can do is start again
            shutil.rmtree(out, ignore_errors=True)
            proc = cifarlab(["train", *CONFIG, "--out", str(out)], env)
        if proc.returncode != 0:
            info.update(ok=False, why=f"resume failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
            return info
    ok, why = same_run(reference, out)
    info.update(ok=ok, seconds=round(time.perf_counter() - start, 1))
    if not ok:
        info["why"] = why
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="random seed of the fault draws (default: random)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kinds: {', '.join(unknown)}")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    # One thread per process: the tiny convs are faster that way, and timings stay stable
    # on a busy machine. A private data cache keeps the soak away from the user's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIFARLAB_CACHE": str(work / "cache")}
    env.pop("CIFARLAB_FAULT", None)

    t0 = time.perf_counter()
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    ref_start = time.perf_counter()
    proc = cifarlab(["train", *CONFIG, "--out", str(reference)], env)
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed: {proc.stderr.strip()[-500:]}")
    train_seconds = sum(json.loads(line)["seconds"] for line in (reference / "metrics.jsonl").read_text().splitlines())
    ref_wall = time.perf_counter() - ref_start

    results = []
    for i in range(args.trials):
        kind = rng.choice(kinds)
        res = trial(kind, rng, reference, work / f"t{i:03d}", env, train_seconds)
        results.append(res)
        print(json.dumps({"trial": i, **res}), file=sys.stderr, flush=True)
        shutil.rmtree(work / f"t{i:03d}", ignore_errors=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        "benchmark": "soak_resume",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}",
        "python": platform.python_version(),
        "command": "python benchmarks/soak_resume.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": seed,
        "trials": len(results),
        "passed": sum(r["ok"] for r in results),
        "failed": [r for r in results if not r["ok"]],
        "by_kind": {k: sum(1 for r in results if r["kind"] == k) for k in kinds},
        "resumed_mid_epoch": sum(1 for r in results if r.get("resumed_from_step") not in (None, 0, 8, 16)),
        "started_over": sum(1 for r in results if r["exit"] != 0 and r.get("resumed_from_step") is None),
        "reference_wall_s": round(ref_wall, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0 if summary["passed"] == summary["trials"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
