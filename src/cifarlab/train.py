"""``fit(config)``: data → model → epochs → run directory. The CLI's ``train`` is a thin
wrapper around it, and so is the notebook use ``cifarlab.train.fit(resolve_config(...))``.

Run directory layout::

    config.toml           resolved config (rerun with --config)
    metrics.jsonl         one JSON object per epoch
    log.txt               what was printed
    checkpoints/last.pt   after every epoch (resume point)
    checkpoints/best.pt   best test accuracy so far
    model.safetensors     final weights, safe to share
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from cifarlab import __version__
from cifarlab.checkpoint import export_safetensors, read_checkpoint, save_checkpoint
from cifarlab.config import TrainConfig, config_from_dict, to_toml
from cifarlab.engine import (
    EpochResult,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    run_epoch,
)
from cifarlab.errors import CifarlabError

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
    """Prints to the terminal and appends to ``log.txt``: one place for all run output."""

    def __init__(self, path: Path | None, stream: TextIO | None = None):
        self.path = path
        self.stream = stream if stream is not None else sys.stdout

    def __call__(self, message: str) -> None:
        print(message, file=self.stream, flush=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(message + "\n")


def load_data(cfg: TrainConfig, progress: bool = False):
    """The dataset the config names, with --limit-train/--limit-test applied."""
    from cifarlab.data import load_dataset

    ds = load_dataset(
        cfg.dataset,
        cfg.data if cfg.dataset != "synthetic" else None,
        num_classes=cfg.num_classes,
        synthetic_train=cfg.synthetic_train,
        synthetic_test=cfg.synthetic_test,
        seed=0,  # synthetic data is fixed across runs so seeds vary only training
        progress=progress,
    )
    if cfg.limit_train or cfg.limit_test:
        ds = replace(ds, train=ds.train.take(cfg.limit_train), test=ds.test.take(cfg.limit_test))
    return ds


def build_context(cfg: TrainConfig, *, progress: bool = False, dataset=None) -> RunContext:
    """Resolve device/precision, load data, build and data-initialise the model, make loaders."""
    from cifarlab.data import AugmentSpec, DeviceLoader

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device)
    augment = AugmentSpec.parse(cfg.augment)  # validate before touching data
    check_model_name(cfg.model)
    ds = dataset if dataset is not None else load_data(cfg, progress=progress)
    torch.manual_seed(cfg.seed)  # model init is part of the run's reproducibility
    model = _make_model(cfg, num_classes=len(ds.classes))
    _init_from_data(model, ds, cfg.seed)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    common = dict(device=device, mean=ds.mean, std=ds.std, channels_last=channels_last)
    train_loader = DeviceLoader(
        ds.train,
        cfg.batch_size,
        shuffle=True,
        augment=augment,
        seed=cfg.seed,
        # A last batch of a handful of images gives noisy BatchNorm statistics and a
        # wasted step; drop it when there is more than one batch.
        drop_last=len(ds.train) > cfg.batch_size,
        **common,
    )
    test_loader = DeviceLoader(ds.test, cfg.eval_batch_size, shuffle=False, **common)
    return RunContext(cfg, device, precision, channels_last, ds, model, train_loader, test_loader)


def check_model_name(name: str) -> None:
    """Reject an unknown model before any data is read."""
    from cifarlab.models import list_models

    if name not in list_models():
        raise CifarlabError(f"unknown model '{name}'; available: {', '.join(list_models())}")


def _make_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from cifarlab.models import create_model

    return create_model(cfg.model, num_classes=num_classes, norm=cfg.norm, dropout=cfg.dropout)


def _init_from_data(model: nn.Module, ds, seed: int) -> None:
    """Data-dependent init (the fast nets' patch-whitening stem), on a fixed image subset."""
    init = getattr(model, "init_from_data", None)
    if init is None:
        return
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=g)[:_WHITEN_IMAGES]
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(ds.std).view(1, 3, 1, 1) * 255
    init((ds.train.images[idx].float() - mean) / std)


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
) -> RunResult:
    """Train per ``cfg``; write the run directory; return the history and where it went.

    ``report`` writes ``report.html``/``README.md`` into the run directory at the end
    (after the checkpoints: a failing report never loses the run).
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
        # The stored config wins except for run-length, device and logging knobs.
        stored = config_from_dict({k: v for k, v in ckpt["config"].items() if v is not None})
        if cfg.epochs != stored.epochs and stored.scheduler in ("onecycle", "cosine"):
            raise CifarlabError(
                f"--resume: this run's {stored.scheduler} schedule was planned for {stored.epochs} epochs "
                f"and cannot be stretched to {cfg.epochs}; resume without --epochs, or start a new run"
            )
        cfg = replace(stored, epochs=cfg.epochs, device=cfg.device, out=str(run_dir), log_every=cfg.log_every)
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        ckpt = None
    cfg = replace(cfg, out=str(run_dir))

    ctx = build_context(cfg, progress=progress)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "log.txt", stream)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    env = environment_info(ctx.device, ctx.precision)
    ds = ctx.dataset
    data_words = "SYNTHETIC data (procedurally generated, not CIFAR-10)" if ds.synthetic else f"{ds.name} data at {ds.root}"
    log(f"cifarlab {__version__} | run dir {run_dir}")
    log(
        f"{data_words}: {len(ds.train)} train / {len(ds.test)} test images, {len(ds.classes)} classes | "
        f"model {cfg.model} ({cfg.norm} norm, {sum(p.numel() for p in ctx.model.parameters()):,} params) | "
        f"device {env['device']} ({env['device_name']}), precision {ctx.precision}"
        + (", channels_last" if ctx.channels_last else "")
    )

    model = ctx.model
    steps_per_epoch = len(ctx.train_loader)
    if steps_per_epoch == 0:
        raise CifarlabError("no training batches: the training split is empty")
    if cfg.lr == "auto":
        from cifarlab.lr_finder import auto_lr

        # The sweep trains copies and restores every RNG: the run below is unaffected.
        lr = auto_lr(ctx, run_dir, log, total_steps=cfg.epochs * steps_per_epoch, reuse=ckpt is not None, progress=progress)
    else:
        lr = float(cfg.lr)
    optimizer = build_optimizer(
        model,
        cfg.optimizer,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        bias_lr_scale=cfg.bias_lr_scale,
        device=ctx.device,
    )
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
    train_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()

    result = RunResult(run_dir=run_dir)
    start_epoch = 0
    elapsed_before = 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if plan.scheduler is not None and ckpt.get("scheduler") is not None:
            plan.scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        result.history = list(ckpt.get("history", []))
        result.lrs = list(ckpt.get("lrs", []))
        result.best_acc = float(ckpt.get("best", {}).get("test_acc", 0.0))
        result.best_epoch = int(ckpt.get("best", {}).get("epoch", 0))
        elapsed_before = float(ckpt.get("seconds", 0.0))
        log(f"resuming from {run_dir / 'checkpoints' / 'last.pt'} after epoch {start_epoch}")
        if start_epoch >= cfg.epochs:
            log(f"nothing to do: the run already finished {start_epoch} of {cfg.epochs} epochs")

    base = {
        "model": model.spec,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "dataset": {"name": ds.name, "root": ds.root, "synthetic": ds.synthetic},
        "config": cfg.to_dict(),
        "versions": {"torch": str(torch.__version__), "cifarlab": __version__},
        "environment": env,
    }
    t0 = time.perf_counter()
    final_eval: EpochResult | None = None
    for epoch in range(start_epoch, cfg.epochs):
        ctx.train_loader.set_epoch(epoch)
        try:
            tr = run_epoch(
                model,
                ctx.train_loader,
                loss_fn=train_loss,
                device=ctx.device,
                precision=ctx.precision,
                optimizer=optimizer,
                scheduler=plan,
                scaler=scaler,
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                progress=progress,
                log_every=cfg.log_every,
                step_offset=epoch * steps_per_epoch,
            )
        except NonFiniteLossError as exc:
            raise CifarlabError(
                f"training diverged: {exc}; nothing was saved past the last good checkpoint. "
                f"Try a lower --lr (or run `cifarlab lr-find`)"
            ) from None
        # TTA multiplies evaluation cost (6 passes for flip-translate); per-epoch numbers only
        # track progress, so pay for it once, on the final epoch that the run reports.
        tta = cfg.tta if epoch + 1 == cfg.epochs else "none"
        # The final epoch's logits feed the report's per-class numbers and galleries.
        te = evaluate_loader(model, ctx.test_loader, ctx.device, ctx.precision, tta, eval_loss, collect=epoch + 1 == cfg.epochs)
        if te.logits is not None:
            final_eval = te
        if plan.on_metric:
            plan.scheduler.step(te.loss)
        result.lrs.extend(tr.lrs)
        row = {
            "epoch": epoch + 1,
            "train_loss": tr.loss,
            "train_acc": tr.accuracy,
            "test_loss": te.loss,
            "test_acc": te.accuracy,
            "lr": tr.lrs[-1] if tr.lrs else optimizer.param_groups[0]["lr"],
            "seconds": round(tr.seconds + te.seconds, 3),
            "train_seconds": round(tr.seconds, 3),
            # wall seconds since fit() started, data loading included (time-to-accuracy)
            "elapsed": round(elapsed_before + time.perf_counter() - launched, 3),
            "tta": tta,
        }
        if ds.synthetic:
            row["data"] = "synthetic"
        result.history.append(row)
        with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        log(
            f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {tr.loss:.4f} acc {tr.accuracy:6.2%}  "
            f"test loss {te.loss:.4f} acc {te.accuracy:6.2%}  lr {row['lr']:.3g}  {row['seconds']:.1f}s"
        )
        improved = te.accuracy > result.best_acc
        if improved:
            result.best_acc, result.best_epoch = te.accuracy, epoch + 1
        payload = {
            **base,
            "state_dict": model.state_dict(),
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "metrics": row,
            "best": {"test_acc": result.best_acc, "epoch": result.best_epoch},
            "history": result.history,
            "lrs": result.lrs,
            "seconds": elapsed_before + time.perf_counter() - t0,
            "optimizer": optimizer.state_dict(),
            "scheduler": plan.scheduler.state_dict() if plan.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        # Write the new last.pt before best.pt: a crash in between leaves both loadable.
        save_checkpoint(run_dir / "checkpoints" / "last.pt", payload)
        if improved:
            save_checkpoint(run_dir / "checkpoints" / "best.pt", payload)
    result.seconds = elapsed_before + time.perf_counter() - t0
    final = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    export_safetensors(run_dir / "model.safetensors", final)
    if result.history:
        last = result.history[-1]
        log(
            f"done in {result.seconds:.1f}s: final test acc {last['test_acc']:.2%}, "
            f"best {result.best_acc:.2%} at epoch {result.best_epoch}"
            + (" (SYNTHETIC data)" if ds.synthetic else "")
        )
    log(f"run saved to {run_dir}")
    from cifarlab.report.build import after_training

    after_training(run_dir, model=model, dataset=ds, final_eval=final_eval, epoch=cfg.epochs, write_report=report, log=log)
    return result


def evaluate_loader(model, loader, device, precision, tta, loss_fn, collect: bool = False) -> EpochResult:
    """Evaluate ``model`` on every batch of ``loader`` (no augmentation)."""
    return run_epoch(model, loader, loss_fn=loss_fn, device=device, precision=precision, tta=tta, collect=collect)

