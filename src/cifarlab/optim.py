"""Optimizers and LR schedules: parameter groups, the builders training and the LR
finder share, and two pieces of the CIFAR speed-run recipes (Muon, Lookahead).

Muon for conv filters, Nesterov SGD for everything else, in one optimizer.

Muon (Keller Jordan, 2024; used by the airbench94_muon CIFAR-10 speed record) replaces
each filter bank's momentum update by the nearest semi-orthogonal matrix: the update,
reshaped to (out_channels, in_channels*kh*kw), is pushed towards U V^T of its SVD by a
few Newton-Schulz iterations. Every direction of the filter bank then moves by about
the same amount however badly conditioned the raw gradient is, which is what lets a
few-epoch run take large, useful steps. As in that record, the filter bank is also
rescaled to a fixed norm (sqrt(out_channels)) before each step: with BatchNorm after
every conv the scale carries no information, and fixing it makes the LR an angle.

Biases, norm shifts and the linear head stay on plain Nesterov SGD with coupled weight
decay (PyTorch's SGD semantics). Keeping both in one :class:`torch.optim.Optimizer`
lets one LR scheduler, one ``state_dict`` and the resume logic treat it like any other.
This is our own implementation of the published method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.runtime import cpu_has_fast_bf16

#: Coefficients of the quintic Newton-Schulz map x -> a x + b x^3 + c x^5 from the Muon
#: write-up: chosen so singular values in (0, 1] are pushed to roughly [0.7, 1.2] in five
#: steps (a steep slope at 0) rather than converging exactly, which costs more steps and
#: does not train better.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate U V^T of the 2-D matrix ``g`` (SVD g = U S V^T) by Newton-Schulz.

    The iteration runs in ``dtype``; bf16 is what Muon uses on GPUs (the map tolerates
    the rounding). Returns a tensor of ``g``'s shape and dtype.
    """
    if g.ndim != 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = _NS_COEFFS
    x = g.to(dtype)
    # Scale so the largest singular value is <= 1 (the Frobenius norm bounds it).
    x = x / (x.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the short side: X X^T is then the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Muon for param groups with ``muon=True`` (>= 2-D weights), Nesterov SGD for the rest.

    Group keys: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (SGD groups only:
    the filters' norm is fixed, so decaying them does nothing) and ``muon``.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon: bool = False,
        ns_steps: int = NS_STEPS,
    ):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"bad MuonSGD settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, ns_steps={ns_steps}"
            )
        # ``muon`` is only the default for groups that do not say (and lets
        # ``type(opt)(groups, **opt.defaults)`` rebuild an optimizer, as the LR finder does).
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, muon=muon, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take only weights with ndim >= 2 (filters, matrices)")
        # Newton-Schulz in bf16 where matmuls are native in bf16 (CUDA, AVX512-BF16/AMX
        # CPUs): the map tolerates the rounding and runs much faster (docs/performance.md).
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self._ns_dtype = torch.bfloat16 if on_cuda or cpu_has_fast_bf16() else torch.float32

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["muon"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(momentum).add_(g)
                update = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    # Fixed filter-bank norm: mean squared norm 1 per output filter.
                    p.mul_(math.sqrt(p.shape[0]) / (p.norm() + 1e-12))
                    # .get: optimizer states saved before ns_steps existed lack the key.
                    steps = group.get("ns_steps", NS_STEPS)
                    update = orthogonalize(update.reshape(p.shape[0], -1), steps, dtype=self._ns_dtype).view_as(p)
                p.add_(update, alpha=-lr)
        return loss


#: Lookahead as airbench94 runs it: every 5 steps the slow copy moves towards the trained
#: weights and the model is reset onto it. Its pull ``decay = 0.95**5 * (t / T)**3`` is ~0
#: early (the model trains freely while the LR is high) and grows to 0.77 at the end, where
#: it averages out the last steps' noise like an EMA, for ~the cost of one lerp per 5 steps.
LOOKAHEAD_EVERY = 5
LOOKAHEAD_BASE = 0.95


class Lookahead:
    """Slow weights that the model is pulled back onto every ``every`` steps.

    Covers every floating-point tensor of ``model.state_dict()``, BatchNorm running
    statistics included, so evaluation after :meth:`finish` sees matching statistics.
    The optimizer's state is left alone (as in airbench94). ``state_dict`` /
    ``load_state_dict`` let a run resume mid-epoch bit for bit.
    """

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = LOOKAHEAD_EVERY, base: float = LOOKAHEAD_BASE):
        if total_steps < 1 or every < 1:
            raise ValueError(f"Lookahead needs total_steps >= 1 and every >= 1, got {total_steps}, {every}")
        self.model = model
        self.total_steps = total_steps
        self.every = every
        self.base = base
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int) -> float:
        """Weight kept on the slow copy at global step ``step`` (1-based, after that step)."""
        return self.base**self.every * min(step / self.total_steps, 1.0) ** 3

    @torch.no_grad()
    def _pull(self, decay: float) -> None:
        current = self.model.state_dict()
        for key, slow in self.slow.items():
            slow.lerp_(current[key], 1.0 - decay)
            current[key].copy_(slow)

    def after_step(self, step: int) -> None:
        """Call after each optimizer step with the global step count (1-based)."""
        if step % self.every == 0:
            self._pull(self.decay(step))

    def finish(self) -> None:
        """End of training: put the model on the slow weights (airbench94's final decay 1)."""
        self._pull(1.0)

    def state_dict(self) -> dict:
        """The slow weights (references: a checkpoint save copies them)."""
        return {"slow": self.slow}

    def load_state_dict(self, state: dict) -> None:
        """Restore slow weights saved by :meth:`state_dict`."""
        slow = state["slow"]
        if set(slow) != set(self.slow):
            raise ValueError("lookahead state does not match the model's parameters")
        for key, value in slow.items():
            self.slow[key].copy_(value)


# ------------------------------------------------------------- optimizer and schedule


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
    muon_ns_steps: int = NS_STEPS,
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov), Adam (L2 in the gradient), AdamW (decoupled decay), or
    Muon: orthogonalised updates at ``muon_lr``/``muon_momentum`` for the conv filters and
    SGD with the other settings for the rest (see :mod:`cifarlab.optim`)."""
    if name == "muon":
        groups = param_groups(model, lr, weight_decay, bias_lr_scale, muon_lr=muon_lr)
        for group in groups:
            if group.get("muon"):
                group["momentum"] = muon_momentum
        return MuonSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=muon_ns_steps)
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


def make_optimizer(cfg, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
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
        muon_ns_steps=cfg.muon_ns_steps,
        device=device,
    )


def make_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int) -> SchedulerPlan:
    """The config's LR schedule over ``total_steps`` optimizer steps."""
    return build_scheduler(
        optimizer,
        cfg.scheduler,
        total_steps=total_steps,
        pct_start=cfg.pct_start,
        anneal=cfg.anneal,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        plateau_factor=cfg.plateau_factor,
        plateau_patience=cfg.plateau_patience,
    )
