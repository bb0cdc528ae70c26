"""LR range test (Smith 2015, "Cyclical Learning Rates"; the fastai ``lr_find`` recipe).

The learning rate grows exponentially from ``start`` to ``end`` over ``steps`` training
steps on real (augmented) training batches. While sweeping, the loss is tracked with
fastai's bias-corrected exponential moving average, and the sweep stops once that
diverges (4x its best) or the loss is non-finite.

The suggestion is a "valley" rule in the style of fastai (>= 2.5), which takes the
longest stretch over which the smoothed loss keeps falling and picks the point halfway
down it (in log-LR). The older steepest-gradient pick reacts to a single noisy step;
the valley looks at the shape of the whole descent. Two changes make it steadier here:

* it runs on a *centred* moving average of the raw losses, not on the EMA. The EMA is
  causal (it must be, for the online stop rule) and lags by ~50 steps, which in a
  100-step sweep over 8 decades shifts the curve by most of a decade toward high LRs;
  after the sweep the future is known, so a lag-free average can be used;
* the stretch starts where the loss leaves its initial plateau (has fallen by 10% of
  its total drop), so noise on the flat part cannot lengthen it toward tiny LRs.

On a least-squares problem whose stable range is known (SGD diverges above 1, the
best LR is 0.5) this suggests 0.03-0.07 (the descent ends at the 0.5 optimum); on the
fast net it suggests 0.2, an LR that trains it well.

The sweep never touches the caller's training state: it trains deep copies of the
model and optimizer and restores every random number generator it may have advanced
(torch CPU and CUDA, Python's ``random``, NumPy), so the run that follows is
bit-identical to one without the sweep.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from cifarlab.engine import Trainer
from cifarlab.optim import make_optimizer
from cifarlab.runtime import autocast
from cifarlab.errors import CifarlabError

# fastai's defaults: a 0.98 EMA (about 50 steps of memory) and "diverged" = 4x the best loss.
SMOOTHING = 0.98
# The plateau ends where the (centred) loss has fallen by this share of its total drop.
PLATEAU_EDGE = 0.1
DIVERGENCE_FACTOR = 4.0
DEFAULT_START = 1e-7
DEFAULT_END = 10.0
DEFAULT_STEPS = 100


@dataclass
class LRFindResult:
    """What a sweep measured and what it suggests.

    ``lrs`` are the LRs of the first param group (the config's ``lr``); groups with a
    scaled LR (``bias_lr_scale``) moved in proportion. ``onecycle`` holds the schedule
    bounds the suggestion implies for the run's div factors.
    """

    lrs: list[float]
    losses: list[float]  # centred moving average of raw_losses (what the suggestion reads)
    raw_losses: list[float]
    ema: list[float]  # online bias-corrected EMA (what the stop rule reads)
    suggestion: float
    suggestion_index: int
    descent: tuple[float, float]  # LRs where the descent the valley was taken on starts and ends
    steepest: float | None  # the classic steepest-descent pick, for comparison only
    stop_reason: str
    start: float
    end: float
    steps: int
    onecycle: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite raw losses become None)."""
        out = asdict(self)
        out["raw_losses"] = [x if math.isfinite(x) else None for x in self.raw_losses]
        out["losses"] = [x if math.isfinite(x) else None for x in self.losses]
        out["ema"] = [x if math.isfinite(x) else None for x in self.ema]
        return out

    def summary(self) -> str:
        """Two human-readable lines: the suggestion and the One-Cycle bounds."""
        oc = self.onecycle
        return (
            f"suggested LR (valley): {self.suggestion:.3g}  [{len(self.lrs)} steps, {self.stop_reason}]\n"
            f"One-Cycle bounds: max_lr {oc['max_lr']:.3g}, initial {oc['initial_lr']:.3g} "
            f"(max_lr/{oc['div_factor']:g}), final {oc['final_lr']:.3g} (initial/{oc['final_div_factor']:g})"
        )


def onecycle_bounds(max_lr: float, div_factor: float, final_div_factor: float) -> dict[str, float]:
    """The LRs torch's OneCycleLR starts at, peaks at and ends at for this max LR."""
    initial = max_lr / div_factor
    return {
        "max_lr": max_lr,
        "initial_lr": initial,
        "final_lr": initial / final_div_factor,
        "div_factor": div_factor,
        "final_div_factor": final_div_factor,
    }


def valley(losses: list[float]) -> int:
    """Index of fastai's "valley" point: halfway down the longest decreasing run of ``losses``.

    "Decreasing run" is the longest strictly decreasing subsequence (not necessarily
    contiguous, so one noisy uptick does not break it), taken to span its length back
    from where it ends; the pick is at ``start + len/3 + len/6`` of that span (fastai's
    formula), well before the minimum where the loss is about to blow up. O(n^2), fine
    for a few hundred points.
    """
    n = len(losses)
    if n == 0:
        raise ValueError("valley() needs at least one loss")
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[j] + 1 > run[i]:
                run[i] = run[j] + 1
        if run[i] > run[best_end]:
            best_end = i
    best_start = best_end - run[best_end]
    third = (best_end - best_start) / 3
    return max(0, min(n - 1, best_start + int(third) + int(third / 2)))


def centred_average(values: list[float], half_width: int) -> list[float]:
    """Moving average over ``[i - half_width, i + half_width]``, window clipped at the ends."""
    out = []
    n = len(values)
    for i in range(n):
        window = values[max(0, i - half_width) : min(n, i + half_width + 1)]
        out.append(sum(window) / len(window))
    return out


def suggest_index(losses: list[float]) -> tuple[int, int, int]:
    """``(suggestion, descent_start, descent_end)`` indices into ``losses`` (raw, all finite).

    Smooth with a centred average (window ~8% of the sweep), find its minimum, find where
    the curve left the initial plateau (its level: median of the first 10%), and apply
    :func:`valley` to that stretch.
    """
    n = len(losses)
    if n < 3:
        raise ValueError("need at least 3 losses")
    smooth = centred_average(losses, max(1, n // 25))
    end = min(range(n), key=smooth.__getitem__)
    plateau = statistics.median(smooth[: max(3, n // 10)])
    drop = plateau - smooth[end]
    if end == 0 or drop <= 0:
        return 0, 0, 0  # the loss never fell: the smallest LR is the only defensible pick
    left = [i for i in range(end) if smooth[i] >= plateau - PLATEAU_EDGE * drop]
    start = left[-1] if left else 0
    return start + valley(smooth[start : end + 1]), start, end


def steepest(losses: list[float]) -> int | None:
    """Index of the most negative finite-difference slope (the classic, fragile pick)."""
    if len(losses) < 3:
        return None
    slopes = [losses[i + 1] - losses[i] for i in range(len(losses) - 1)]
    return min(range(len(slopes)), key=slopes.__getitem__)


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore torch (CPU and every CUDA device), ``random`` and NumPy RNGs on exit."""
    import numpy as np

    cpu = torch.get_rng_state()
    # Only read CUDA states if CUDA is already initialised: reading would initialise it.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    npy = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


def copy_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of ``model`` and ``optimizer``, the copy's optimizer driving the copy's params.

    The optimizer is rebuilt from its class, hyper-parameters and state dict rather than
    deep-copied: an LR scheduler patches ``optimizer.step`` with a closure over the
    original optimizer, and a deep copy would keep calling that original.
    """
    twin = copy.deepcopy(model)
    mapping = {id(p): q for p, q in zip(model.parameters(), twin.parameters())}
    groups = []
    for g in optimizer.param_groups:
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [mapping[id(p)] for p in g["params"]]})
    twin_opt = type(optimizer)(groups, **optimizer.defaults)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin, twin_opt


def _endless(batches: Iterable) -> Iterator:
    """Cycle over ``batches``; a DeviceLoader moves to its next epoch (fresh order and augmentation)."""
    set_epoch = getattr(batches, "set_epoch", None)
    epoch = getattr(batches, "epoch", 0)
    while True:
        empty = True
        for item in batches:
            empty = False
            yield item
        if empty:
            raise CifarlabError("LR finder: the training loader yields no batches")
        if set_epoch is not None:
            epoch += 1
            set_epoch(epoch)


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str = "fp32",
    start: float = DEFAULT_START,
    end: float = DEFAULT_END,
    steps: int = DEFAULT_STEPS,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    progress: bool = False,
) -> LRFindResult:
    """Sweep the LR exponentially from ``start`` to ``end`` on copies of model and optimizer.

    ``batches`` is iterated (cycled if shorter than ``steps``); a DeviceLoader's epoch is
    restored afterwards. Each param group keeps its LR ratio to the first group; Muon
    groups (``muon=True``, see :mod:`cifarlab.optim`) keep their own LR, so with Muon the
    sweep is over the ``lr`` key of the head and biases. Stops
    early when the smoothed loss exceeds 4x its best or any loss is non-finite.
    """
    if not (0 < start < end) or not math.isfinite(end):
        raise CifarlabError(f"LR finder needs 0 < start < end, got start={start:g}, end={end:g}")
    if steps < 5:
        raise CifarlabError(f"LR finder needs at least 5 steps, got {steps}")
    twin, opt = copy_training_state(model, optimizer)
    sweep = _Sweep(twin, opt, loss_fn, device, precision)
    saved_epoch = getattr(batches, "epoch", None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="lr-find", leave=False, dynamic_ncols=True)
    twin.train()
    try:
        with preserved_rng_state():
            stream = _endless(batches)
            for i in range(steps):
                stopped = sweep.step(start * (end / start) ** (i / (steps - 1)), next(stream))
                if bar is not None:
                    bar.update(1)
                if stopped:
                    break
    finally:
        if bar is not None:
            bar.close()
        if saved_epoch is not None:
            batches.set_epoch(saved_epoch)
    return _result(sweep.lrs, sweep.raw, sweep.ema, sweep.stop, start, end, steps, div_factor, final_div_factor)


class _Sweep:
    """The steps of one range test: set the LR, train one batch, track the loss, judge the stop."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn, device: torch.device, precision: str):
        self.model, self.loss_fn = model, loss_fn
        self.device, self.precision = device, precision
        self.swept = [g for g in opt.param_groups if not g.get("muon")]
        base = self.swept[0]["lr"] or 1.0
        self.ratios = [g["lr"] / base if base else 1.0 for g in self.swept]
        # The step itself is training's (engine.Trainer), without a schedule: the LR is set here.
        self.trainer = Trainer(opt, scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None)
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.ema: list[float] = []
        self.avg = 0.0
        self.best = math.inf
        self.stop = "reached end LR"

    def step(self, lr: float, batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Train one batch at ``lr``; True when the sweep must stop here."""
        for g, r in zip(self.swept, self.ratios):
            g["lr"] = lr * r
        x, y = batch
        with autocast(self.device, self.precision):
            loss = self.loss_fn(self.model(x).float(), y)
        self.trainer.step(loss)
        value = float(loss.detach())  # one host sync per step: the stop rule needs it
        self.lrs.append(lr)
        self.raw.append(value)
        if not math.isfinite(value):
            self.stop = f"loss became non-finite at LR {lr:.3g}"
            self.ema.append(math.inf)
            return True
        i = len(self.raw) - 1
        self.avg = SMOOTHING * self.avg + (1 - SMOOTHING) * value
        smoothed = self.avg / (1 - SMOOTHING ** (i + 1))
        self.ema.append(smoothed)
        self.best = min(self.best, smoothed)
        if i > 0 and smoothed > DIVERGENCE_FACTOR * self.best:
            self.stop = f"loss diverged at LR {lr:.3g}"
            return True
        return False


def _result(lrs, raw, ema, stop, start, end, steps, div_factor, final_div_factor) -> LRFindResult:
    # Judge only finite losses (a non-finite one can only be the last, where the sweep stopped).
    n = sum(1 for v in raw if math.isfinite(v))
    if n < 5:
        raise CifarlabError(
            f"LR finder: the loss diverged after {len(raw)} steps, before any LR could be judged; "
            f"lower --start (now {start:g})"
        )
    finite = raw[:n]
    idx, lo, hi = suggest_index(finite)
    smooth = centred_average(finite, max(1, n // 25))
    st = steepest(ema[:n])
    return LRFindResult(
        lrs=lrs,
        losses=smooth + [math.inf] * (len(raw) - n),
        raw_losses=raw,
        ema=ema,
        suggestion=lrs[idx],
        suggestion_index=idx,
        descent=(lrs[lo], lrs[hi]),
        steepest=lrs[st] if st is not None else None,
        stop_reason=stop,
        start=start,
        end=end,
        steps=steps,
        onecycle=onecycle_bounds(lrs[idx], div_factor, final_div_factor),
    )


def find_lr_for_run(ctx, *, start: float = DEFAULT_START, end: float = DEFAULT_END, steps: int = DEFAULT_STEPS, progress: bool = False) -> LRFindResult:
    """Run the range test for a ``context.RunContext``: its model, optimizer settings, loss and loader.

    The optimizer is built exactly as training builds it (same groups, weight decay,
    momentum, bias LR scale) so the suggestion is for the config's ``lr`` key.
    """
    cfg = ctx.cfg
    optimizer = make_optimizer(cfg, ctx.model, start, ctx.runtime.device)
    return lr_range_test(
        ctx.model,
        optimizer,
        ctx.train_loader,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        device=ctx.runtime.device,
        precision=ctx.runtime.precision,
        start=start,
        end=end,
        steps=steps,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        progress=progress,
    )


def plot_lr_find(result: LRFindResult):
    """Matplotlib Figure: smoothed (and raw) loss vs LR on a log axis, suggestion marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    finite = [(lr, r) for lr, r in zip(result.lrs, result.raw_losses) if math.isfinite(r)]
    if finite:
        ax.plot(*zip(*finite), color="0.75", lw=0.8, label="loss per step")
    sm = [(lr, s) for lr, s in zip(result.lrs, result.losses) if math.isfinite(s)]
    ax.plot(*zip(*sm), color="C0", lw=1.8, label="smoothed loss (centred)")
    if result.descent[1] > result.descent[0]:
        ax.axvspan(*result.descent, color="C0", alpha=0.08, label="descent judged")
    y = result.losses[result.suggestion_index]
    ax.plot([result.suggestion], [y], "o", color="C3", ms=8, zorder=5, label=f"valley: {result.suggestion:.3g}")
    ax.axvline(result.suggestion, color="C3", ls=":", lw=1)
    ax.set_xscale("log")
    # Clip the y-range to what matters: the blow-up at the end would flatten the rest.
    values = [s for _, s in sm]
    top, bottom = max(values[: max(2, len(values) - 5)]), min(values)
    pad = 0.15 * (top - bottom) or 0.05 * abs(top) or 0.1
    ax.set_ylim(bottom - pad, top + pad)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def save_lr_find(result: LRFindResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``lr_find.png`` and ``lr_find.json`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / "lr_find.png", out_dir / "lr_find.json"
    plot_lr_find(result).savefig(png, format="png", metadata={"Software": None})
    js.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    return png, js


def load_lr_find(path: str | Path) -> dict[str, Any] | None:
    """The saved sweep of a run directory (its ``lr_find.json``), or None."""
    path = Path(path)
    if path.is_dir():
        path = path / "lr_find.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# A sweep shorter than this cannot show a descent worth judging (each step would raise
# the LR by more than 1.5x); beyond 100 steps (fastai's default) a sweep longer than the
# training run it serves is cut to the run's length.
AUTO_MIN_STEPS = 50


def auto_lr(ctx, run_dir: str | Path, log: Callable[[str], None], *, total_steps: int, reuse: bool = False, progress: bool = False) -> float:
    """``--lr auto``: run the finder for a training context, save its plot/JSON in ``run_dir``,
    log the suggestion and return it (the One-Cycle max LR).

    ``reuse`` (a resumed run) takes the suggestion saved by the original run instead of
    sweeping again, so a resumed run keeps the LR it started with.
    """
    if reuse:
        saved = load_lr_find(run_dir)
        if saved is not None:
            log(f"lr auto: reusing the LR finder's suggestion {saved['suggestion']:.3g} from {Path(run_dir) / 'lr_find.json'}")
            return float(saved["suggestion"])
    steps = max(AUTO_MIN_STEPS, min(DEFAULT_STEPS, total_steps))
    log(f"lr auto: LR range test, {steps} steps from {DEFAULT_START:g} to {DEFAULT_END:g} on copies of the model")
    result = find_lr_for_run(ctx, start=DEFAULT_START, end=DEFAULT_END, steps=steps, progress=progress)
    save_lr_find(result, run_dir)
    for line in result.summary().splitlines():
        log(line)
    log(f"lr auto: training with max LR {result.suggestion:.3g} (plot: {Path(run_dir) / 'lr_find.png'})")
    return result.suggestion
