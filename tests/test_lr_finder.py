"""LR range test: the valley rule, a sensible LR where the good range is known, and a
sweep that leaves model, optimizer, scheduler, loader and every RNG untouched."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.lr_finder import lr_range_test, onecycle_bounds, valley


def test_valley_picks_a_point_two_thirds_down_the_longest_descent():
    # flat, then a clean descent over indices 10..40, then a blow-up
    losses = [2.0] * 10 + [2.0 - 0.05 * i for i in range(1, 31)] + [0.5 + 0.3 * i for i in range(10)]
    i = valley(losses)
    assert 10 < i < 40
    assert losses[i] > min(losses)  # before the minimum, where the loss is about to turn
    # a single noisy uptick does not break the descent
    noisy = list(losses)
    noisy[25] += 0.2
    assert abs(valley(noisy) - i) <= 1


def test_onecycle_bounds_follow_torch_onecycle():
    b = onecycle_bounds(0.4, div_factor=25, final_div_factor=1e4)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=10, div_factor=25, final_div_factor=1e4)
    g = opt.param_groups[0]
    assert math.isclose(g["initial_lr"], b["initial_lr"]) and math.isclose(g["min_lr"], b["final_lr"])
    del sched


def _least_squares_batches(seed: int, d: int = 10, n_batches: int = 40):
    """y = x.w + noise with x ~ N(0, I): MSE's Hessian is 2I, so plain SGD is stable for
    lr < 1 (2 / largest eigenvalue) and fastest near lr = 0.5."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 1, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(256, d, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(256, 1, generator=g)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_a_sensible_lr_where_the_good_range_is_known(seed):
    batches = _least_squares_batches(seed)
    torch.manual_seed(seed)
    model = nn.Linear(10, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    res = lr_range_test(model, opt, batches, loss_fn=nn.MSELoss(), device=torch.device("cpu"), start=1e-5, end=100, steps=100)
    assert "diverged" in res.stop_reason  # the sweep stops on divergence, well before lr=100
    assert res.lrs[-1] < 10
    # Stable range is (0, 1), fastest near 0.5: the descent ends near the optimum and the
    # valley sits safely inside the stable range, not absurdly small.
    assert 0.2 <= res.descent[1] <= 1.0, res.descent
    assert 0.01 < res.suggestion < 0.5, res.suggestion
    assert res.onecycle["max_lr"] == res.suggestion
    # Training at the suggestion really works: 40 steps cut the loss by >10x.
    torch.manual_seed(seed)
    m = nn.Linear(10, 1, bias=False)
    o = torch.optim.SGD(m.parameters(), lr=res.suggestion)
    first = nn.functional.mse_loss(m(batches[0][0]), batches[0][1]).item()
    for x, y in batches:
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    assert nn.functional.mse_loss(m(batches[0][0]), batches[0][1]).item() < first / 10


def test_bad_sweep_arguments_are_user_errors():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(loss_fn=nn.MSELoss(), device=torch.device("cpu"))
    with pytest.raises(CifarlabError, match="start < end"):
        lr_range_test(model, opt, [(torch.zeros(2, 2), torch.zeros(2, 1))], start=1.0, end=0.1, **kw)
    with pytest.raises(CifarlabError, match="at least 5 steps"):
        lr_range_test(model, opt, [(torch.zeros(2, 2), torch.zeros(2, 1))], steps=2, **kw)


def _context():
    from cifarlab.config import resolve_config
    from cifarlab.context import build_context

    cfg = resolve_config(
        preset="fast",
        overrides=dict(
            dataset="synthetic", num_classes=4, batch_size=16, limit_train=64, limit_test=16,
            device="cpu", dropout=0.3, augment="crop:2,flip,cutout:8", seed=3,
        ),
    )
    return build_context(cfg)


def _train_three_steps(ctx, sweep: bool):
    """Build optimizer + One-Cycle as fit() does, optionally sweep, then train 3 steps."""
    from cifarlab.engine import Trainer, run_epoch
    from cifarlab.optim import build_optimizer, build_scheduler
    from cifarlab.lr_finder import find_lr_for_run

    cfg = ctx.cfg
    opt = build_optimizer(ctx.model, cfg.optimizer, lr=0.5, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay, bias_lr_scale=cfg.bias_lr_scale, device=ctx.runtime.device)
    plan = build_scheduler(opt, "onecycle", total_steps=20, div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor)
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    if sweep:
        # Directly on the live optimizer whose step() the scheduler has patched, and via the
        # fit() entry point (fresh optimizer): neither may leak into the run.
        lr_range_test(ctx.model, opt, ctx.train_loader, loss_fn=nn.CrossEntropyLoss(), device=ctx.runtime.device, steps=5)
        find_lr_for_run(ctx, steps=5)
    ctx.train_loader.set_epoch(0)
    run_epoch(ctx.model, itertools.islice(ctx.train_loader, 3), ctx.runtime, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2),
              trainer=Trainer(opt, plan))
    return {
        "weights": {k: v.clone() for k, v in ctx.model.state_dict().items()},
        "opt": opt.state_dict(),
        "sched": plan.scheduler.state_dict(),
        "loader_epoch": ctx.train_loader.epoch,
        "rng": (torch.rand(3), random.random(), float(np.random.rand())),
    }


def test_sweep_leaves_the_following_run_bit_identical():
    plain = _train_three_steps(_context(), sweep=False)
    swept = _train_three_steps(_context(), sweep=True)
    assert plain["weights"].keys() == swept["weights"].keys()
    for k in plain["weights"]:
        assert torch.equal(plain["weights"][k], swept["weights"][k]), k
    for pid, st in plain["opt"]["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                assert torch.equal(val, swept["opt"]["state"][pid][key]), (pid, key)
    assert plain["opt"]["param_groups"] == swept["opt"]["param_groups"]
    assert plain["sched"]["last_epoch"] == swept["sched"]["last_epoch"] == 3
    assert plain["loader_epoch"] == swept["loader_epoch"]
    assert torch.equal(plain["rng"][0], swept["rng"][0])
    assert plain["rng"][1:] == swept["rng"][1:]


def test_lr_find_cli_prints_suggestion_and_saves_plot(tmp_path, capsys):
    from cifarlab.cli import main

    out = tmp_path / "lrf"
    rc = main([
        "lr-find", "--preset", "fast", "--dataset", "synthetic", "--num-classes", "4", "--batch-size", "16",
        "--limit-train", "64", "--limit-test", "32", "--device", "cpu", "--steps", "8", "--out", str(out),
    ])
    text = capsys.readouterr().out
    assert rc == 0
    assert "suggested LR (valley)" in text and "One-Cycle bounds" in text and "SYNTHETIC" in text
    data = json.loads((out / "lr_find.json").read_text())
    assert len(data["lrs"]) <= 8 and data["suggestion"] > 0
    assert set(data["onecycle"]) >= {"max_lr", "initial_lr", "final_lr"}
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lr-find", "--dataset", "synthetic", "--steps", "2", "--out", str(out)]) == 2


def test_sweep_leaves_muon_filter_lr_alone():
    """With Muon the range test sweeps the `lr` key (head and biases); the filters stay at muon_lr."""
    from torch import nn

    from cifarlab.optim import build_optimizer
    from cifarlab.lr_finder import lr_range_test

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    opt = build_optimizer(net, "muon", lr=1e-4, momentum=0.85, nesterov=True, weight_decay=0, bias_lr_scale=2, muon_lr=0.24)
    assert [g["name"] for g in opt.param_groups] == ["weights", "biases", "filters"]
    seen = []
    real_step = type(opt).step

    def spy(self, closure=None):
        seen.append([(g["name"], g["lr"]) for g in self.param_groups])
        return real_step(self, closure)

    type(opt).step = spy
    try:
        x = torch.randn(64, 3, 8, 8)
        batches = [(x[i : i + 16], torch.randint(0, 3, (16,))) for i in range(0, 64, 16)]
        lr_range_test(net, opt, batches, loss_fn=nn.CrossEntropyLoss(), device=torch.device("cpu"), start=1e-4, end=1.0, steps=6)
    finally:
        type(opt).step = real_step
    assert seen and all(dict(s)["filters"] == 0.24 for s in seen)
    assert dict(seen[-1])["weights"] > 100 * dict(seen[0])["weights"]
    assert all(dict(s)["biases"] == pytest.approx(2 * dict(s)["weights"]) for s in seen)
