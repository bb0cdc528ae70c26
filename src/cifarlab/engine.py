"""The training/evaluation step: one ``run_epoch`` for both, plus the pieces it needs
(device and precision resolution, optimizer and scheduler construction, TTA).

Nothing here knows about files, configs on disk or the CLI; ``train.py`` wires it up.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.gemm_conv import use_gemm_convs


# ----------------------------------------------------------------------------- device


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda if available else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CifarlabError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX).

    Without them bf16 autocast is emulated and *much* slower than fp32 (measured 25x
    slower for ResNet18 on an AVX2-only AMD EPYC), so 'auto' must not pick it blindly.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the autocast dtype name: 'fp32', 'bf16' or 'fp16'."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise CifarlabError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for a resolved precision ('fp32' → no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def resolve_channels_last(setting: str, device: torch.device) -> bool:
    """channels_last is faster for convs on CUDA (tensor cores) and on CPU with oneDNN."""
    if setting == "auto":
        return device.type == "cuda" or torch.backends.mkldnn.is_available()
    return setting == "on"


def cpu_has_amx() -> bool:
    """True when the CPU has AMX-BF16 matrix units (Intel Xeon since Sapphire Rapids)."""
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16"))
    except (AttributeError, RuntimeError):
        return False


def resolve_gemm_convs(setting: str, device: torch.device, precision: str, compiled: bool = False) -> bool:
    """Whether small-map convs run as im2col matmuls (:mod:`cifarlab.gemm_conv`).

    'auto' turns them on only where they were measured faster (bf16 on a CPU with AMX:
    ResNet18's training step 1.29x, benchmarks/conv_paths.py) and leaves torch.compile's
    graphs alone; on CUDA cuDNN's kernels are fast at every map size.
    """
    if setting == "auto":
        return device.type == "cpu" and precision == "bf16" and cpu_has_amx() and not compiled
    return setting == "on"


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool, gemm_convs: bool) -> nn.Module:
    """Move ``model`` to ``device`` in the memory format and conv path chosen for it."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if gemm_convs:
        use_gemm_convs(model)
    return model


# -------------------------------------------------------------------------- optimizer


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float, muon_lr: float | None = None
) -> list[dict]:
    """Split trainable params into weights (ndim > 1) and biases/norm affines (ndim <= 1).

    With ``bias_lr_scale`` s != 1 the 1-d group gets lr*s and weight_decay/s, keeping the
    per-step decay lr*wd unchanged (airbench's bias_scaler). Frozen params are skipped.
    With ``muon_lr`` the conv filters (ndim 4) form a third group, ``muon=True``, at that
    LR, placed last: the first group is the one at ``lr``, which logs, LR curves and
    divergence advice report.
    """
    filters, weights, biases = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if muon_lr is not None and p.ndim == 4:
                filters.append(p)
            else:
                (weights if p.ndim > 1 else biases).append(p)
    groups = []
    if weights or not filters:
        groups.append({"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"})
    if biases:
        groups.append(
            {
                "params": biases,
                "lr": lr * bias_lr_scale,
                "weight_decay": weight_decay / bias_lr_scale,
                "name": "biases",
            }
        )
    if filters:
        groups.append({"params": filters, "lr": muon_lr, "weight_decay": 0.0, "name": "filters", "muon": True})
    return groups


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    bias_lr_scale: float = 1.0,
    muon_lr: float = 0.24,
    muon_momentum: float = 0.6,
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam (L2 in the gradient), AdamW (decoupled decay), or
    Muon: orthogonalised updates at ``muon_lr``/``muon_momentum`` for the conv filters and
    SGD with the other settings for the rest (see :mod:`cifarlab.optim`)."""
    if name == "muon":
        from cifarlab.optim import MuonSGD

        groups = param_groups(model, lr, weight_decay, bias_lr_scale, muon_lr=muon_lr)
        for group in groups:
            if group.get("muon"):
                group["momentum"] = muon_momentum
        return MuonSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    groups = param_groups(model, lr, weight_decay, bias_lr_scale)
    # fused kernels exist for CUDA; on CPU the foreach path is the fast one.
    fast = {"fused": True} if device is not None and device.type == "cuda" else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fast)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999), **fast)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **fast)
    raise CifarlabError(f"unknown optimizer '{name}'")


@dataclass(frozen=True)
class SchedulerPlan:
    """How and when to step the LR scheduler."""

    scheduler: object | None
    per_step: bool  # One-Cycle/cosine/constant step every batch; plateau once per epoch
    on_metric: bool  # ReduceLROnPlateau wants the test loss


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    total_steps: int,
    pct_start: float = 0.25,
    anneal: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    plateau_factor: float = 0.1,
    plateau_patience: int = 3,
) -> SchedulerPlan:
    """One-Cycle (per step), ReduceLROnPlateau (per epoch on test loss), cosine, constant."""
    sched = torch.optim.lr_scheduler
    if name == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        s = sched.OneCycleLR(
            optimizer,
            max_lr=max_lrs,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            # Momentum cycling fights Nesterov's fixed-momentum recipes of the speed-runs
            # and Adam's beta1; keep momentum constant as airbench does.
            cycle_momentum=False,
        )
        return SchedulerPlan(s, per_step=True, on_metric=False)
    if name == "cosine":
        return SchedulerPlan(sched.CosineAnnealingLR(optimizer, T_max=total_steps), True, False)
    if name == "constant":
        return SchedulerPlan(None, per_step=True, on_metric=False)
    if name == "plateau":
        s = sched.ReduceLROnPlateau(optimizer, mode="min", factor=plateau_factor, patience=plateau_patience)
        return SchedulerPlan(s, per_step=False, on_metric=True)
    raise CifarlabError(f"unknown scheduler '{name}'")


# -------------------------------------------------------------------------------- TTA


def predict_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits for batch ``x`` (B,3,H,W), averaged over test-time augmentations.

    'flip' averages the image and its mirror; 'flip-translate' adds the mirror-pair of
    1-pixel translations (up-left and down-right), as the CIFAR speed-runs do (weights
    0.5 for the untranslated pair, 0.25 each for the translated pairs).
    """
    if tta == "none":
        return model(x)
    logits = 0.5 * (model(x) + model(x.flip(-1)))
    if tta == "flip":
        return logits
    padded = F.pad(x, (1, 1, 1, 1))  # zero = dataset mean after normalisation
    h, w = x.shape[-2:]
    up_left = padded[..., :h, :w]
    down_right = padded[..., 2:, 2:]
    shifted = 0.0
    for xs in (up_left, down_right):
        shifted = shifted + 0.5 * (model(xs) + model(xs.flip(-1)))
    return 0.5 * logits + 0.25 * shifted


# ---------------------------------------------------------------------------- epochs


@dataclass
class EpochResult:
    """What one pass over a loader produced. Tensors are on the CPU."""

    loss: float
    accuracy: float
    n: int
    seconds: float
    steps: int
    lrs: list[float] = field(default_factory=list)  # LR of the first param group per step
    logits: torch.Tensor | None = None  # (n, classes) float32, when collect=True
    targets: torch.Tensor | None = None  # (n,) int64, when collect=True


StepHook = Callable[[int, dict], None]


class NonFiniteLossError(RuntimeError):
    """Raised by run_epoch when the training loss becomes NaN/inf."""

    def __init__(self, step: int, lr: float):
        super().__init__(f"loss became non-finite at step {step} (lr {lr:.3g})")
        self.step = step
        self.lr = lr


def run_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str = "fp32",
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: SchedulerPlan | None = None,
    scaler: torch.amp.GradScaler | None = None,
    tta: str = "none",
    collect: bool = False,
    total: int | None = None,
    desc: str = "",
    progress: bool = False,
    log_every: int = 20,
    on_step: StepHook | None = None,
    step_offset: int = 0,
    check_finite: bool = True,
) -> EpochResult:
    """One pass over ``batches``: trains when ``optimizer`` is given, else evaluates.

    Loss and correct counts accumulate on the device; the host reads them only every
    ``log_every`` steps (progress bar) and at the end, so CUDA steps never wait on the
    host. ``on_step(global_step, info)`` runs after each training step (checkpointing,
    signal handling); ``info`` holds this step's ``loss`` and ``lr`` and the epoch's running
    ``loss_sum``/``correct`` device tensors and sample count ``n`` (for a mid-epoch
    checkpoint). ``step_offset`` is the global step of the first batch.
    ``check_finite=False`` leaves the NaN/inf check to the caller: under DDP one rank must
    not raise alone while the others wait in the next all-reduce.
    """
    train = optimizer is not None
    model.train(train)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    lrs: list[float] = []
    all_logits: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    bar = _progress(total, desc, progress)
    start = time.perf_counter()
    step = 0
    # Non-finite checks need a host sync; on CPU that is free, on CUDA do it per log interval.
    check_every = (1 if device.type == "cpu" else log_every) if check_finite else 0
    grad_ctx = contextlib.nullcontext() if train else torch.inference_mode()
    with grad_ctx:
        for step, (x, y) in enumerate(batches, start=1):
            with autocast(device, precision):
                logits = model(x) if train else predict_logits(model, x, tta)
                loss = loss_fn(logits.float(), y)
            if train:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                lrs.append(optimizer.param_groups[0]["lr"])
                if scheduler is not None and scheduler.per_step and scheduler.scheduler is not None:
                    scheduler.scheduler.step()
                if check_every and step % check_every == 0 and not torch.isfinite(loss):
                    raise NonFiniteLossError(step_offset + step, lrs[-1])
            batch = y.shape[0]
            n += batch
            loss_sum += loss.detach().double() * batch
            correct += (logits.argmax(1) == y).sum()
            if collect:
                all_logits.append(logits.detach().float().cpu())
                all_targets.append(y.cpu())
            if bar is not None and step % log_every == 0:
                postfix = {"loss": f"{loss_sum.item() / n:.4f}", "acc": f"{correct.item() / n:.4f}"}
                if train:
                    postfix["lr"] = f"{lrs[-1]:.3g}"
                bar.set_postfix(postfix, refresh=False)
            if bar is not None:
                bar.update(1)
            if train and on_step is not None:
                on_step(
                    step_offset + step,
                    {"loss": loss, "lr": lrs[-1], "loss_sum": loss_sum, "correct": correct, "n": n},
                )
    if bar is not None:
        bar.close()
    if train and check_finite and step and not torch.isfinite(loss):
        raise NonFiniteLossError(step_offset + step, lrs[-1])
    seconds = time.perf_counter() - start
    total_loss = loss_sum.item() / max(n, 1)
    return EpochResult(
        loss=total_loss,
        accuracy=correct.item() / max(n, 1),
        n=n,
        seconds=seconds,
        steps=step,
        lrs=lrs,
        logits=torch.cat(all_logits) if collect and all_logits else None,
        targets=torch.cat(all_targets) if collect and all_targets else None,
    )


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Recall of each class from a confusion matrix (nan for a class with no samples)."""
    totals = confusion.sum(1)
    return [
        (confusion[i, i].item() / totals[i].item()) if totals[i] > 0 else math.nan
        for i in range(confusion.shape[0])
    ]

