"""``fit(config)``: data → model → epochs → run directory. The CLI's ``train`` is a thin
wrapper around it, and so is the notebook use ``cifarlab.train.fit(resolve_config(...))``.

Run directory layout::

    config.toml           resolved config (rerun with --config)
    metrics.jsonl         one JSON object per epoch
    log.txt               what was printed
    checkpoints/last.pt   after every epoch and every --save-every-steps steps (resume point)
    checkpoints/best.pt   best test accuracy so far
    model.safetensors     final weights, safe to share
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import torch
from torch import nn

from cifarlab import __version__, _faults, distributed
from cifarlab.checkpoint import (
    NonFiniteStateError,
    atomic_write,
    export_safetensors,
    read_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from cifarlab.config import TrainConfig, config_from_dict, to_toml
from cifarlab.engine import (
    EpochResult,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    prepare_model,
    resolve_channels_last,
    resolve_device,
    resolve_gemm_convs,
    resolve_precision,
    run_epoch,
)
from cifarlab.errors import CifarlabError, TrainingInterrupted, TrainingStopped
from cifarlab.guards import (
    Chance,
    StopSignals,
    check_disk_space,
    divergence_message,
    is_stalled,
    signal_name,
    stall_message,
)
from cifarlab.optim import Lookahead

# The whitening stem of the fast nets is fitted on this many training images: enough
# for a stable 12x12 patch covariance, small enough to cost well under a second.
_WHITEN_IMAGES = 5000


@dataclass
class RunContext:
    """Everything a training run builds from its config, shared by train, lr-find, explain."""

    cfg: TrainConfig
    device: torch.device
    precision: str
    channels_last: bool
    dataset: Any  # cifarlab.data.Dataset
    model: nn.Module
    train_loader: Any  # cifarlab.data.DeviceLoader
    test_loader: Any
    gemm_convs: bool = False  # small-map convs run as matmuls (cifarlab.gemm_conv)


@dataclass
class RunResult:
    """What ``fit`` returns."""

    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_acc: float = 0.0
    best_epoch: int = 0
    seconds: float = 0.0
    lrs: list[float] = field(default_factory=list)


class RunLog:
    """Prints to the terminal and appends to ``log.txt``: one place for all run output.

    ``quiet`` (DDP ranks other than 0) prints and writes nothing. A failing append
    (full disk) is reported once and otherwise ignored: the log must not be the thing
    that kills a run; the next checkpoint save reports the disk problem properly.
    """

    def __init__(self, path: Path | None, stream: TextIO | None = None, quiet: bool = False):
        self.path = path
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self._write_failed = False

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        print(message, file=self.stream, flush=True)
        self.record(message)

    def record(self, message: str) -> None:
        """Append ``message`` to log.txt only (for what the CLI prints on stderr itself)."""
        if self.quiet or self.path is None:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                print(f"cifarlab: warning: cannot append to {self.path}: {exc.strerror}", file=sys.stderr, flush=True)


def load_data(cfg: TrainConfig, progress: bool = False):
    """The dataset the config names, with --holdout, then --limit-train/--limit-test applied.

    With ``holdout`` the returned ``test`` split is the held-out part of train
    (``eval_split == "holdout"``); the real test split is not used.
    """
    from cifarlab.data import load_dataset

    ds = load_dataset(
        cfg.dataset,
        cfg.data if cfg.dataset != "synthetic" else None,
        num_classes=cfg.num_classes,
        synthetic_train=cfg.synthetic_train,
        synthetic_test=cfg.synthetic_test,
        seed=0,  # synthetic data is fixed across runs so seeds vary only training
        progress=progress,
        skip_bad=cfg.skip_bad,
    )
    if cfg.holdout:
        rest, held = ds.train.hold_out(cfg.holdout)
        ds = replace(ds, train=rest, test=held, eval_split="holdout")
    if cfg.limit_train or cfg.limit_test:
        ds = replace(ds, train=ds.train.take(cfg.limit_train), test=ds.test.take(cfg.limit_test))
    return ds


def build_context(
    cfg: TrainConfig, *, progress: bool = False, dataset=None, dist: distributed.DistInfo | None = None
) -> RunContext:
    """Resolve device/precision, load data, build and data-initialise the model, make loaders.

    With ``dist`` (a multi-process run, see :mod:`cifarlab.distributed`) the device is
    ``cuda:LOCAL_RANK`` on GPUs, ``batch_size`` stays the *global* batch (each rank takes
    batch_size / world_size, so a preset trains the same on any number of processes),
    the train loader yields this rank's shard and the test loader a disjoint strided
    slice of the test split, so summed metrics cover every test image exactly once.
    """
    from cifarlab.data import AugmentSpec, DeviceLoader, ResizeSchedule, Split

    dist = dist or distributed.DistInfo()
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device)
    augment = AugmentSpec.parse(cfg.augment)  # validate before touching data
    resize = ResizeSchedule.parse(cfg.progressive_resize)
    check_model_name(cfg.model, whiten_eps=cfg.whiten_eps)
    if cfg.batch_size % dist.world_size:
        raise CifarlabError(
            f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
            f"{dist.world_size} processes; use a multiple of {dist.world_size}"
        )
    ds = dataset if dataset is not None else _load_data_in_turn(cfg, progress, dist)
    resize.check_images(*ds.train.images.shape[-2:])
    torch.manual_seed(cfg.seed)  # model init is part of the run's reproducibility
    model = _make_model(cfg, num_classes=len(ds.classes))
    _init_from_data(model, ds, cfg.seed)
    gemm_convs = resolve_gemm_convs(cfg.gemm_convs, device, precision, compiled=cfg.compile)
    model = prepare_model(model, device, channels_last, gemm_convs)
    common = dict(device=device, mean=ds.mean, std=ds.std, channels_last=channels_last)
    train_loader = DeviceLoader(
        ds.train,
        cfg.batch_size // dist.world_size,
        shuffle=True,
        augment=augment,
        seed=cfg.seed,
        # A last batch of a handful of images gives noisy BatchNorm statistics and a
        # wasted step; drop it when there is more than one batch.
        drop_last=len(ds.train) > cfg.batch_size,
        rank=dist.rank,
        world_size=dist.world_size,
        epoch_sizes=resize.epoch_sizes(cfg.epochs),
        **common,
    )
    test = ds.test
    if dist.enabled:  # no wrap-around padding here: every test image counted once
        test = Split(test.images[dist.rank :: dist.world_size], test.labels[dist.rank :: dist.world_size])
    test_loader = DeviceLoader(test, cfg.eval_batch_size, shuffle=False, **common)
    return RunContext(cfg, device, precision, channels_last, ds, model, train_loader, test_loader, gemm_convs)


def _load_data_in_turn(cfg: TrainConfig, progress: bool, dist: distributed.DistInfo):
    """Load the dataset; under DDP rank 0 first (it downloads, decodes and fills the
    cache), then the others, which read the cache. If rank 0 fails, the others fail the
    same way right after it instead of waiting at the barrier."""
    if not dist.enabled:
        return load_data(cfg, progress=progress)
    if not dist.is_main:
        distributed.barrier()
    try:
        return load_data(cfg, progress=progress and dist.is_main)
    finally:
        if dist.is_main:
            distributed.barrier()


def check_model_name(name: str, whiten_eps: float | None = None) -> None:
    """Reject an unknown model, or a whitening option it has no stem for, before any data is read."""
    from cifarlab.models.registry import MODELS, list_models

    if name not in list_models():
        raise CifarlabError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    if whiten_eps is not None and "whiten_eps" not in MODELS[name].defaults:
        stems = ", ".join(m for m in list_models() if "whiten_eps" in MODELS[m].defaults)
        raise CifarlabError(
            f"config key 'whiten_eps' applies only to models with a whitening stem ({stems}); "
            f"model '{name}' has none"
        )


def _make_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from cifarlab.models import create_model

    extra = {} if cfg.whiten_eps is None else {"whiten_eps": cfg.whiten_eps}
    return create_model(cfg.model, num_classes=num_classes, norm=cfg.norm, dropout=cfg.dropout, **extra)


def _init_from_data(model: nn.Module, ds, seed: int) -> None:
    """Data-dependent init (the fast nets' patch-whitening stem), on a fixed image subset."""
    init = getattr(model, "init_from_data", None)
    if init is None:
        return
    init(stem_fit_batch(ds, seed))


def stem_fit_batch(ds, seed: int, images: int = _WHITEN_IMAGES) -> torch.Tensor:
    """The batch a run fits its whitening stem on: ``images`` training images drawn with
    ``seed``, normalised like training, as a float (N, C, H, W) tensor on the CPU."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=g)[:images]
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(ds.std).view(1, 3, 1, 1) * 255
    return (ds.train.images[idx].float() - mean) / std


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The config's optimizer at peak LR ``lr``: one builder for training and the LR finder,
    so the finder sweeps exactly the groups, decay and momentum the run will use."""
    return build_optimizer(
        model,
        cfg.optimizer,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        bias_lr_scale=cfg.bias_lr_scale,
        muon_lr=cfg.muon_lr,
        muon_momentum=cfg.muon_momentum,
        device=device,
    )


def default_run_dir(cfg: TrainConfig) -> Path:
    """runs/<preset or model>-<UTC timestamp>."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset or cfg.model}-{stamp}"


def latest_run_dir(cfg: TrainConfig) -> Path | None:
    """The newest runs/<preset or model>-* folder that has a last.pt to resume from."""
    candidates = sorted(Path("runs").glob(f"{cfg.preset or cfg.model}-*/checkpoints/last.pt"))
    return candidates[-1].parent.parent if candidates else None


def environment_info(device: torch.device, precision: str) -> dict[str, str]:
    """Device and library versions, recorded in checkpoints and reports."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": str(torch.get_num_threads()),
        "precision": precision,
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # TorchVersion would not pass weights_only loading
        "cifarlab": __version__,
        "platform": platform.platform(),
    }


def fit(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool | None = None,
    stream: TextIO | None = None,
    report: bool = True,
    resume_overrides: Mapping[str, Any] | None = None,
) -> RunResult:
    """Train per ``cfg``; write the run directory; return the history and where it went.

    ``report`` writes ``report.html``/``README.md`` into the run directory at the end
    (after the checkpoints: a failing report never loses the run).

    ``resume`` continues ``<out>/checkpoints/last.pt`` exactly where it stopped, mid-epoch
    included, with the stored config; ``resume_overrides`` names the keys the user set
    explicitly (the CLI passes its flags) and only run length, device, logging and
    robustness keys may change. SIGINT/SIGTERM stop after the current step with a saved
    checkpoint (:class:`TrainingInterrupted`); a NaN loss or a run stuck at chance stops
    with advice (:class:`TrainingStopped`). Under torchrun every process calls fit();
    rank 0 prints and writes the files.
    """
    launched = time.perf_counter()
    if progress is None:
        progress = sys.stderr.isatty()
    if resume:
        run_dir = Path(cfg.out) if cfg.out else latest_run_dir(cfg)
        if run_dir is None or not (run_dir / "checkpoints" / "last.pt").is_file():
            where = run_dir or f"runs/{cfg.preset or cfg.model}-*"
            raise CifarlabError(f"--resume: no checkpoint to resume from in {where} (expected checkpoints/last.pt)")
        ckpt = read_checkpoint(run_dir / "checkpoints" / "last.pt")
        stored = config_from_dict({k: v for k, v in ckpt["config"].items() if v is not None})
        cfg = _resume_config(stored, cfg, resume_overrides, run_dir)
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / "checkpoints" / "last.pt").is_file():  # before any data is read
            raise CifarlabError(
                f"{run_dir} already holds a run (checkpoints/last.pt); continue it with "
                f"`cifarlab train --out {shlex.quote(str(run_dir))} --resume`, or pass another --out"
            )
        ckpt = None
    cfg = replace(cfg, out=str(run_dir))

    # Under torchrun every process runs this function; without it this is a no-op.
    dist = distributed.setup(resolve_device(cfg.device).type)
    main = dist.is_main
    ctx = build_context(cfg, progress=progress and main, dist=dist)
    # Launch to data-on-device and model built; with a warm decode cache this is the
    # start-up cost a user waits for before the first step (import time excluded).
    ready_s = time.perf_counter() - launched
    model = ctx.model
    ckpt_dir = run_dir / "checkpoints"
    _main_then_agree(dist, lambda: _prepare_run_dir(run_dir, cfg, model, resuming=ckpt is not None))
    log = RunLog(run_dir / "log.txt", stream, quiet=not main)
    env = environment_info(ctx.device, ctx.precision)
    ds = ctx.dataset
    data_words = "SYNTHETIC data (procedurally generated, not CIFAR-10)" if ds.synthetic else f"{ds.name} data at {ds.root}"
    log(f"cifarlab {__version__} | run dir {run_dir}")
    log(
        f"{data_words}: {len(ds.train)} train / {len(ds.test)} {ds.eval_split} images"
        + (" (held out of train; the test split is not used)" if ds.eval_split != "test" else "")
        + f", {len(ds.classes)} classes | "
        f"model {cfg.model} ({cfg.norm} norm, {sum(p.numel() for p in ctx.model.parameters()):,} params) | "
        f"device {env['device']} ({env['device_name']}), precision {ctx.precision}"
        + (", channels_last" if ctx.channels_last else "")
        + (", small-map convs as matmuls" if ctx.gemm_convs else "")
        + f" | ready in {ready_s:.1f}s"
        + (f" | {dist.world_size} processes ({dist.backend}), {cfg.batch_size // dist.world_size} images each per step" if dist.enabled else "")
    )
    from cifarlab.data import ResizeSchedule

    resized = ResizeSchedule.parse(cfg.progressive_resize).describe(cfg.epochs)
    if resized:
        log(f"progressive resize: {resized}, the rest at full size")
    skipped = getattr(ds, "skipped", ())
    if skipped:
        listed = _write_skipped(run_dir, skipped) if main else None
        log(f"warning: --skip-bad: training without {len(skipped)} unreadable file(s); list in {listed}")

    steps_per_epoch = len(ctx.train_loader)
    if steps_per_epoch == 0:
        raise CifarlabError("no training batches: the training split is empty")
    if cfg.lr == "auto":
        from cifarlab.lr_finder import auto_lr

        # The sweep trains copies and restores every RNG: the run below is unaffected.
        # Under DDP rank 0 sweeps alone and the others take its answer: every rank must
        # train with the same LR.
        lr = auto_lr(ctx, run_dir, log, total_steps=cfg.epochs * steps_per_epoch, reuse=ckpt is not None, progress=progress) if main else 0.0
        lr = distributed.all_reduce_max([lr])[0]
    else:
        lr = float(cfg.lr)
    optimizer = make_optimizer(cfg, model, lr, ctx.device)
    plan = build_scheduler(
        optimizer,
        cfg.scheduler,
        total_steps=cfg.epochs * steps_per_epoch,
        pct_start=cfg.pct_start,
        anneal=cfg.anneal,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        plateau_factor=cfg.plateau_factor,
        plateau_patience=cfg.plateau_patience,
    )
    scaler = torch.amp.GradScaler(ctx.device.type) if ctx.precision == "fp16" else None
    # Built from the freshly initialised model; a resume overwrites its slow weights below.
    lookahead = Lookahead(model, total_steps=cfg.epochs * steps_per_epoch) if cfg.lookahead else None
    train_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()

    result = RunResult(run_dir=run_dir)
    start_epoch = start_step = 0
    partial: dict[str, Any] | None = None  # the resumed epoch's sums before the checkpoint
    elapsed_before = 0.0
    amp_skipped_total = 0
    if ckpt is not None:
        if list(ds.classes) != list(ckpt["classes"]):
            raise CifarlabError(
                f"--resume: the data's classes {list(ds.classes)[:5]} differ from the checkpoint's "
                f"{list(ckpt['classes'])[:5]}; pass the --data the run was trained on"
            )
        start_step = _check_resume_shape(ckpt, steps_per_epoch, dist.world_size, log)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if plan.scheduler is not None and ckpt.get("scheduler") is not None:
            plan.scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if lookahead is not None:
            lookahead.load_state_dict(ckpt["lookahead"])
        # Last, after everything above that may draw random numbers (model init).
        restore_rng_state(ckpt.get("rng"))
        start_epoch = int(ckpt["epoch"])
        partial = ckpt.get("partial") if start_step else None
        result.history = list(ckpt.get("history", []))
        result.lrs = list(ckpt.get("lrs", []))
        result.best_acc = float(ckpt.get("best", {}).get("test_acc", 0.0))
        result.best_epoch = int(ckpt.get("best", {}).get("epoch", 0))
        elapsed_before = float(ckpt.get("seconds", 0.0))
        amp_skipped_total = int(ckpt.get("amp_skipped_steps", 0))
        if main:
            # Rows written after the checkpoint (a kill between the metrics append and the
            # save) would otherwise appear twice once those epochs are trained again.
            _write_metrics(run_dir, result.history)
        at = f"epoch {start_epoch}" if not start_step else f"step {start_step}/{steps_per_epoch} of epoch {start_epoch + 1}"
        log(f"resuming from {ckpt_dir / 'last.pt'} after {at}")
        if start_epoch >= cfg.epochs:
            log(f"nothing to do: the run already finished {start_epoch} of {cfg.epochs} epochs")

    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Gradients are averaged over ranks in the backward pass; rank 0's BatchNorm
        # statistics are broadcast at each forward. Checkpoints use the plain module.
        train_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    # Compile only the training forward/backward; checkpoints, evaluation and explanations
    # keep using the plain module (state_dict keys without the _orig_mod prefix).
    train_model = torch.compile(train_model) if cfg.compile else train_model

    base = {
        "model": model.spec,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "dataset": {"name": ds.name, "root": ds.root, "synthetic": ds.synthetic},
        "config": cfg.to_dict(),
        "versions": {"torch": str(torch.__version__), "cifarlab": __version__},
        "environment": env,
        "steps_per_epoch": steps_per_epoch,
        "world_size": dist.world_size,
    }
    saver = _Saver(run_dir, dist)
    chance = Chance.of_labels(ds.train.labels, len(ds.classes))
    t0 = time.perf_counter()

    def payload(epochs_done: int, step_in_epoch: int, metrics: dict | None, part: dict | None) -> dict:
        # Called on rank 0 only, inside the save: no collectives in here.
        return {
            **base,
            "state_dict": model.state_dict(),
            "epoch": epochs_done,
            "step": epochs_done * steps_per_epoch + step_in_epoch,
            "step_in_epoch": step_in_epoch,
            "partial": part,
            "metrics": metrics,
            "best": {"test_acc": result.best_acc, "epoch": result.best_epoch},
            "history": result.history,
            "lrs": result.lrs,
            "seconds": elapsed_before + time.perf_counter() - t0,
            "optimizer": optimizer.state_dict(),
            "scheduler": plan.scheduler.state_dict() if plan.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "lookahead": lookahead.state_dict() if lookahead is not None else None,
            "amp_skipped_steps": amp_skipped_total,  # completed epochs; the current one's is in partial
            "rng": rng_state(),
        }

    final_eval: EpochResult | None = None
    with StopSignals(notify=_signal_notice if main else None) as signals:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            prior = partial if epoch == start_epoch else None
            ctx.train_loader.set_epoch(epoch)
            hook = _StepHook(
                epoch=epoch,
                steps_per_epoch=steps_per_epoch,
                save_every=cfg.save_every_steps,
                # Agreeing across ranks costs a host sync: every step on CPU, where it is
                # free, per log interval on GPUs.
                sync_every=1 if ctx.device.type == "cpu" else cfg.log_every,
                signals=signals,
                dist=dist,
                saver=saver,
                scaler=scaler,
                lookahead=lookahead,
                prior=prior,
                payload=lambda k, part, e=epoch: payload(e, k, result.history[-1] if result.history else None, part),
            )
            try:
                tr = run_epoch(
                    train_model,
                    ctx.train_loader.iter_from(first),
                    loss_fn=train_loss,
                    device=ctx.device,
                    precision=ctx.precision,
                    optimizer=optimizer,
                    scheduler=plan,
                    scaler=scaler,
                    total=steps_per_epoch - first,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    progress=progress and main,
                    log_every=cfg.log_every,
                    on_step=hook,
                    step_offset=epoch * steps_per_epoch + first,
                    # Under DDP the hook decides together with the other ranks.
                    check_finite=not dist.enabled,
                )
            except NonFiniteLossError as exc:
                message = divergence_message(exc.step, exc.lr, run_dir, saver.last_good)
                log.record(message)
                raise TrainingStopped(message) from None
            except _Interrupt as stop:
                where = f"at step {stop.step_in_epoch}/{steps_per_epoch} of epoch {epoch + 1}"
                raise TrainingInterrupted(_interrupted(stop.signum, where, run_dir, dist, log), stop.signum) from None
            # Exact epoch totals: this rank's sums, summed over ranks, plus the part of the
            # epoch trained before a mid-epoch resume.
            loss_sum, correct, n = distributed.all_reduce_sum([tr.loss * tr.n, round(tr.accuracy * tr.n), tr.n])
            epoch_lrs, train_seconds = list(tr.lrs), tr.seconds
            if prior:
                loss_sum, correct, n = loss_sum + prior["loss_sum"], correct + prior["correct"], n + prior["n"]
                epoch_lrs, train_seconds = list(prior["lrs"]) + epoch_lrs, train_seconds + prior["seconds"]
            tr_loss, tr_acc = loss_sum / max(n, 1), correct / max(n, 1)
            amp_skipped_epoch = (int(prior.get("amp_skipped", 0)) if prior else 0) + hook.amp_skipped()
            amp_skipped_total += amp_skipped_epoch
            last_epoch = epoch + 1 == cfg.epochs
            if last_epoch and lookahead is not None:
                lookahead.finish()  # evaluate and save the slow weights the run ends on
            # TTA multiplies evaluation cost (6 passes for flip-translate); per-epoch numbers only
            # track progress, so pay for it once, on the final epoch that the run reports.
            tta = cfg.tta if last_epoch else "none"
            te = None
            if last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                # Every rank evaluates with rank 0's BatchNorm statistics: the ones the checkpoint holds.
                distributed.broadcast_buffers(model)
                # The final epoch's logits feed the report's per-class numbers and galleries.
                te = evaluate_loader(model, ctx.test_loader, ctx.device, ctx.precision, tta, eval_loss, collect=last_epoch)
                if dist.enabled:
                    te = _reduce_eval(te, len(ds.test), dist)
                if te.logits is not None:
                    final_eval = te
            if plan.on_metric:  # config validation guarantees an evaluation every epoch here
                plan.scheduler.step(te.loss)
            result.lrs.extend(epoch_lrs)
            row = {
                "epoch": epoch + 1,
                "train_loss": tr_loss,
                "train_acc": tr_acc,
                # None on epochs that eval_every skips
                "test_loss": te.loss if te else None,
                "test_acc": te.accuracy if te else None,
                "lr": epoch_lrs[-1] if epoch_lrs else optimizer.param_groups[0]["lr"],
                "seconds": round(train_seconds + (te.seconds if te else 0.0), 3),
                "train_seconds": round(train_seconds, 3),
                # wall seconds since fit() started, data loading included (time-to-accuracy)
                "elapsed": round(elapsed_before + time.perf_counter() - launched, 3),
                "tta": tta,
            }
            if ds.eval_split != "test":  # test_* columns then hold held-out-train numbers
                row["eval_split"] = ds.eval_split
            if scaler is not None:
                row["amp_skipped_steps"] = amp_skipped_epoch
            if ds.synthetic:
                row["data"] = "synthetic"
            result.history.append(row)
            if main:
                _append_metrics(run_dir, row, saver)
            log(
                f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {tr_loss:.4f} acc {tr_acc:6.2%}  "
                + (f"{ds.eval_split} loss {te.loss:.4f} acc {te.accuracy:6.2%}  " if te else f"({ds.eval_split}: not evaluated)  ")
                + f"lr {row['lr']:.3g}  {row['seconds']:.1f}s"
            )
            if scaler is not None and amp_skipped_epoch:
                log(
                    f"fp16: the GradScaler skipped {amp_skipped_epoch} of {steps_per_epoch} steps this epoch "
                    "(inf/NaN gradients; a few early on are normal while it finds its scale)"
                )
            improved = te is not None and te.accuracy > result.best_acc
            if improved:
                result.best_acc, result.best_epoch = te.accuracy, epoch + 1
            saver.save(
                lambda e=epoch, r=row: payload(e + 1, 0, r, None),
                best=improved,
                step=(epoch + 1) * steps_per_epoch,
                lr=row["lr"],
            )
            if is_stalled(epoch + 1, tr_loss, tr_acc, chance):
                message = stall_message(epoch + 1, tr_loss, tr_acc, chance, lr, run_dir, stopping=cfg.stop_on_stall)
                if cfg.stop_on_stall:
                    log.record(message)
                    raise TrainingStopped(message)
                log(message)
            # A signal that arrived during evaluation: the epoch's checkpoint is saved, stop here.
            signum = int(distributed.all_reduce_max([signals.signum])[0])
            if signum and epoch + 1 < cfg.epochs:
                raise TrainingInterrupted(_interrupted(signum, f"after epoch {epoch + 1}", run_dir, dist, log), signum)
    result.seconds = elapsed_before + time.perf_counter() - t0
    if main:
        final = read_checkpoint(ckpt_dir / "last.pt")
        try:
            export_safetensors(run_dir / "model.safetensors", final)
        except OSError as exc:
            raise CifarlabError(
                f"cannot write {run_dir / 'model.safetensors'}: {exc.strerror or exc}; the checkpoints are intact. "
                f"Free some space, then export it with: {resume_command(run_dir, dist.world_size)}"
            ) from None
    if result.history:
        last = result.history[-1]
        log(
            f"done in {result.seconds:.1f}s: final {ds.eval_split} acc {last['test_acc']:.2%}, "
            f"best {result.best_acc:.2%} at epoch {result.best_epoch}"
            + (" (SYNTHETIC data)" if ds.synthetic else "")
        )
    log(f"run saved to {run_dir}")
    if main:  # one report per run, written by the process that writes the files
        from cifarlab.report.build import after_training

        after_training(run_dir, model=model, dataset=ds, final_eval=final_eval, epoch=cfg.epochs, write_report=report, log=log)
    # Every rank leaves together. A rank that returned early destroyed its gloo process
    # group while rank 0 was still writing files, and about 1 in 8 two-process runs on
    # the AMX Xeon then died in that teardown ("terminate called without an active
    # exception", SIGABRT; 0 in 40 with this barrier, 2026-12-03).
    distributed.barrier()
    return result


def evaluate_loader(model, loader, device, precision, tta, loss_fn, collect: bool = False) -> EpochResult:
    """Evaluate ``model`` on every batch of ``loader`` (no augmentation)."""
    return run_epoch(model, loader, loss_fn=loss_fn, device=device, precision=precision, tta=tta, collect=collect)


# ------------------------------------------------------------------ robustness glue
# The pieces fit() uses to never lose a run: resume checks, the step hook, safe saves.

#: Keys that --resume may change: how long, where and how verbosely the run continues,
#: and its robustness knobs. Anything else would silently make it a different run.
_RESUMABLE_KEYS = frozenset({"epochs", "device", "log_every", "save_every_steps", "stop_on_stall", "compile", "data"})
# ("data": the same dataset may live at another path on another machine; the classes are
# checked against the checkpoint's.)


def _resume_config(stored: TrainConfig, cfg: TrainConfig, overrides: Mapping[str, Any] | None, run_dir: Path) -> TrainConfig:
    """The config a resumed run continues with: the stored one plus the allowed changes.

    ``overrides`` are the keys the user set explicitly (CLI flags); None (a library call)
    keeps the old contract of taking epochs, device and log_every from ``cfg``.
    """
    if overrides is None:
        changes = {"epochs": cfg.epochs, "device": cfg.device, "log_every": cfg.log_every}
    else:
        changes = {k: getattr(cfg, k) for k in overrides if k in _RESUMABLE_KEYS}
        refused = sorted(
            k for k in overrides if k not in _RESUMABLE_KEYS and k != "out" and getattr(stored, k, None) != getattr(cfg, k, None)
        )
        if refused:
            flags = ", ".join("--" + k.replace("_", "-") for k in refused)
            raise CifarlabError(
                f"--resume continues the run stored in {run_dir}, but {flags} would change it; drop "
                f"{'that option' if len(refused) == 1 else 'those options'}, or start a new run with another --out"
            )
    epochs = changes.get("epochs", stored.epochs)
    if epochs != stored.epochs and stored.scheduler in ("onecycle", "cosine"):
        raise CifarlabError(
            f"--resume: this run's {stored.scheduler} schedule was planned for {stored.epochs} epochs "
            f"and cannot be stretched to {epochs}; resume without --epochs, or start a new run"
        )
    return replace(stored, **changes, out=str(run_dir))


def _check_resume_shape(ckpt: dict, steps_per_epoch: int, world_size: int, log: RunLog) -> int:
    """Validate that ``ckpt`` can be continued by this run; return its step within the epoch."""
    step = int(ckpt.get("step_in_epoch", 0))
    saved_world = int(ckpt.get("world_size", 1))
    saved_steps = int(ckpt.get("steps_per_epoch", steps_per_epoch))
    if step and (saved_world != world_size or saved_steps != steps_per_epoch):
        raise CifarlabError(
            f"--resume: the checkpoint was saved mid-epoch by {saved_world} process(es) with {saved_steps} steps per "
            f"epoch, but this run has {world_size} and {steps_per_epoch}; resume with the same number of processes "
            "and the same data"
        )
    if not 0 <= step < steps_per_epoch:
        raise CifarlabError(f"--resume: the checkpoint's step_in_epoch {step} is out of range; it is damaged")
    if saved_world != world_size:
        log(
            f"note: this run was trained by {saved_world} process(es) and continues on {world_size}: "
            "correct, but not bit for bit what the original setup would have produced"
        )
    return step


def _main_then_agree(dist: distributed.DistInfo, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0; if it raised, make every rank raise (nobody waits forever)."""
    error: CifarlabError | None = None
    if dist.is_main:
        try:
            fn()
        except CifarlabError as exc:
            error = exc
    if dist.enabled and distributed.all_reduce_max([1.0 if error else 0.0])[0] and error is None:
        error = CifarlabError("stopped because rank 0 failed (its message says why)")
    if error is not None:
        raise error


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, model: nn.Module, resuming: bool) -> None:
    """Check disk space, create the run directory, drop temp files of killed saves, write config.toml."""
    ckpt_dir = run_dir / "checkpoints"
    check_disk_space(run_dir, model, [ckpt_dir / "last.pt", ckpt_dir / "best.pt"] if resuming else [])
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # A save killed between writing its temp file and the rename leaves the temp file.
        for folder in (ckpt_dir, run_dir):
            for stale in folder.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
        if not resuming:
            _write_metrics(run_dir, [])
        (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    except OSError as exc:
        raise CifarlabError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(run_dir / "metrics.jsonl", lambda f: f.write(text.encode("utf-8")))


def _append_metrics(run_dir: Path, row: dict, saver: "_Saver") -> None:
    try:
        with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise CifarlabError(saver.disk_message(exc, run_dir / "metrics.jsonl")) from None


def _write_skipped(run_dir: Path, skipped: Any) -> Path:
    path = run_dir / "skipped_files.txt"
    try:
        path.write_text("".join(f"{p}\n" for p in skipped), encoding="utf-8")
    except OSError:
        pass  # informational only
    return path


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    """The command that continues ``run_dir`` (a torchrun line for multi-process runs)."""
    out = shlex.quote(str(run_dir))
    if world_size <= 1:
        return f"cifarlab train --out {out} --resume"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    nodes = max(1, world_size // max(per_node, 1))
    launch = f"torchrun --nproc_per_node={per_node}" + (f" --nnodes={nodes} (plus your rendezvous options)" if nodes > 1 else "")
    return f"{launch} -m cifarlab train --out {out} --resume"


def _interrupted(signum: int, where: str, run_dir: Path, dist: distributed.DistInfo, log: RunLog) -> str:
    message = (
        f"interrupted by {signal_name(signum)} {where}; checkpoint saved to {run_dir / 'checkpoints' / 'last.pt'}. "
        f"Resume with: {resume_command(run_dir, dist.world_size)}"
    )
    log.record(message)
    return message


def _signal_notice(message: str) -> None:
    print(f"cifarlab: {message}", file=sys.stderr, flush=True)


def _reduce_eval(te: EpochResult, total: int, dist: distributed.DistInfo) -> EpochResult:
    """Whole-test-set metrics from every rank's strided slice (and its logits, if collected)."""
    loss_sum, correct, n = distributed.all_reduce_sum([te.loss * te.n, round(te.accuracy * te.n), te.n])
    logits, targets = te.logits, te.targets
    if logits is not None:
        logits = distributed.gather_strided(logits, total)
        targets = distributed.gather_strided(targets, total)
    return replace(te, loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), n=int(n), logits=logits, targets=targets)


class _Interrupt(Exception):
    """Raised by the step hook after the interrupt checkpoint is written."""

    def __init__(self, signum: int, step_in_epoch: int):
        super().__init__(signum)
        self.signum = signum
        self.step_in_epoch = step_in_epoch


class _Saver:
    """Writes fit()'s checkpoints: rank 0 writes, every rank learns whether that worked.

    Never writes non-finite weights (save_checkpoint checks) and turns a full disk into
    a one-line error that says what survived; the atomic write keeps the old file.
    """

    def __init__(self, run_dir: Path, dist: distributed.DistInfo):
        self.run_dir = run_dir
        self.dir = run_dir / "checkpoints"
        self.last = self.dir / "last.pt"
        self.best = self.dir / "best.pt"
        self.dist = dist
        self.last_good: Path | None = self.last if self.last.is_file() else None

    def save(self, make_payload: Callable[[], dict], *, step: int, lr: float, best: bool = False) -> None:
        """Write last.pt (and best.pt) from ``make_payload()``; a collective under DDP."""
        error: CifarlabError | None = None
        if self.dist.is_main:
            try:
                data = make_payload()
                # Write the new last.pt before best.pt: a crash in between leaves both loadable.
                save_checkpoint(self.last, data)
                self.last_good = self.last
                if best:
                    save_checkpoint(self.best, data)
            except NonFiniteStateError:
                error = TrainingStopped(divergence_message(step, lr, self.run_dir, self.last_good))
            except OSError as exc:
                error = CifarlabError(self.disk_message(exc, self.dir))
        if self.dist.enabled and distributed.all_reduce_max([1.0 if error else 0.0])[0] and error is None:
            error = CifarlabError("stopped because rank 0 could not write a checkpoint (its message says why)")
        if error is not None:
            raise error

    def disk_message(self, exc: OSError, where: Path) -> str:
        """One line for a failed write: what failed, what survived, how to continue."""
        if self.last_good is not None:
            tail = (
                f"the previous checkpoint {self.last_good} is intact. Free some space, then resume with: "
                f"{resume_command(self.run_dir, self.dist.world_size)}"
            )
        else:
            tail = "no checkpoint had been written yet. Free some space and start the run again"
        return f"cannot write to {where}: {exc.strerror or exc}; {tail}"


class _StepHook:
    """run_epoch's ``on_step`` in fit(): fault-injection points, GradScaler skip counting,
    the DDP agreement (non-finite loss, stop signal), mid-epoch checkpoints, graceful stop.

    Everything except the agreement is host-side bookkeeping; the agreement and the
    saves happen on steps that every rank computes identically, so collectives match.
    """

    def __init__(
        self,
        *,
        epoch: int,
        steps_per_epoch: int,
        save_every: int,
        sync_every: int,
        signals: StopSignals,
        dist: distributed.DistInfo,
        saver: _Saver,
        scaler: Any,
        prior: dict | None,
        payload: Callable[[int, dict], dict],
        lookahead: Lookahead | None = None,
    ):
        self.epoch = epoch
        self.spe = steps_per_epoch
        self.save_every = save_every
        self.sync_every = max(1, sync_every)
        self.signals = signals
        self.dist = dist
        self.saver = saver
        self.scaler = scaler
        self.lookahead = lookahead
        self.prior = prior or {}
        self.payload = payload
        self.lrs: list[float] = []
        self.t0 = time.perf_counter()
        # GradScaler: its scale drops exactly when it skips a step (inf/NaN gradients).
        # Compare device tensors each step, read the count once per epoch: no per-step sync.
        self._skipped: torch.Tensor | None = None
        self._prev_scale: torch.Tensor | None = None
        self._initial_scale = 0.0
        if scaler is not None:
            current = getattr(scaler, "_scale", None)
            if current is not None:
                self._prev_scale = current.detach().clone()
            else:
                self._initial_scale = float(scaler.get_scale())  # no sync before the first step

    def amp_skipped(self) -> int:
        """Steps the GradScaler skipped in this epoch so far (0 without fp16)."""
        return int(self._skipped.item()) if self._skipped is not None else 0

    def _count_amp_skip(self) -> None:
        scale = getattr(self.scaler, "_scale", None)
        if scale is None:
            return
        if self._prev_scale is None:
            self._prev_scale = torch.full_like(scale, self._initial_scale)
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=scale.device)
        self._skipped += (scale < self._prev_scale).sum()
        self._prev_scale.copy_(scale)

    def __call__(self, global_step: int, info: dict) -> None:
        if self.lookahead is not None:  # part of the step: before any checkpoint of it
            self.lookahead.after_step(global_step)
        _faults.at_step(global_step)
        self.lrs.append(info["lr"])
        if self.scaler is not None:
            self._count_amp_skip()
        k = global_step - self.epoch * self.spe  # steps done in this epoch
        last = k == self.spe
        save_due = bool(self.save_every) and k % self.save_every == 0 and not last
        signum = self.signals.signum
        if self.dist.enabled:
            if not (save_due or last or k % self.sync_every == 0):
                return
            bad = 0.0 if bool(torch.isfinite(info["loss"])) else 1.0
            bad, agreed = distributed.all_reduce_max([bad, float(signum)])
            if bad:
                raise NonFiniteLossError(global_step, info["lr"])
            signum = int(agreed)
        if last or not (save_due or signum):
            return  # the epoch end evaluates, saves and then honours a pending signal
        sums = distributed.all_reduce_sum([float(info["loss_sum"]), float(info["correct"]), float(info["n"])])
        prior = self.prior
        part = {
            "loss_sum": float(prior.get("loss_sum", 0.0)) + sums[0],
            "correct": int(prior.get("correct", 0)) + int(sums[1]),
            "n": int(prior.get("n", 0)) + int(sums[2]),
            "lrs": [float(v) for v in prior.get("lrs", [])] + self.lrs,
            "seconds": float(prior.get("seconds", 0.0)) + time.perf_counter() - self.t0,
            "amp_skipped": int(prior.get("amp_skipped", 0)) + self.amp_skipped(),
        }
        self.saver.save(lambda: self.payload(k, part), step=global_step, lr=info["lr"])
        if signum:
            raise _Interrupt(signum, k)
