"""Engine pieces: precision choice, optimizer groups, schedulers, TTA, metrics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarlab.engine import NonFiniteLossError, Trainer, confusion_matrix, per_class_accuracy, predict_logits, run_epoch
from cifarlab.errors import CifarlabError
from cifarlab.optim import build_optimizer, build_scheduler
from cifarlab.runtime import Runtime, resolve_precision

CPU = Runtime(torch.device("cpu"))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_precision_auto_never_picks_slow_bf16_on_cpu(monkeypatch):
    import cifarlab.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(CifarlabError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bias_group_gets_scaled_lr_and_same_decay_product():
    opt = build_optimizer(_net(), "sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, bias_lr_scale=64)
    w, b = opt.param_groups
    assert all(p.ndim > 1 for p in w["params"]) and all(p.ndim <= 1 for p in b["params"])
    assert b["lr"] == pytest.approx(6.4)
    assert b["lr"] * b["weight_decay"] == pytest.approx(w["lr"] * w["weight_decay"])
    assert w["nesterov"] is True


def test_frozen_params_are_not_optimised():
    net = _net()
    net[0].weight.requires_grad_(False)
    opt = build_optimizer(net, "adamw", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.01)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(net[0].weight) not in ids


def test_onecycle_is_per_step_and_peaks_at_max_lr():
    opt = build_optimizer(_net(), "sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=0)
    plan = build_scheduler(opt, "onecycle", total_steps=100, pct_start=0.25, anneal="linear", div_factor=10, final_div_factor=100)
    assert plan.per_step and not plan.on_metric
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        plan.scheduler.step()
    assert lrs[0] == pytest.approx(0.04)
    assert max(lrs) == pytest.approx(0.4, rel=1e-3)
    assert lrs.index(max(lrs)) in range(23, 27)
    assert lrs[-1] < 0.01


def test_plateau_steps_on_metric():
    opt = build_optimizer(_net(), "sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0)
    plan = build_scheduler(opt, "plateau", total_steps=10, plateau_factor=0.5, plateau_patience=0)
    assert plan.on_metric and not plan.per_step
    plan.scheduler.step(1.0)
    plan.scheduler.step(2.0)  # worse → halve
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_flip_tta_is_flip_invariant():
    net = _net().eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        a = predict_logits(net, x, "flip")
        b = predict_logits(net, x.flip(-1), "flip")
        c = predict_logits(net, x, "flip-translate")
    assert torch.allclose(a, b, atol=1e-5)
    assert c.shape == a.shape
    # known answer: the 6 views by hand, translations reflect-padded (airbench's TTA)
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[..., :8, :8], padded[..., 2:, 2:]]
    with torch.no_grad():
        pair = [0.5 * (net(v) + net(v.flip(-1))) for v in views]
        zeros = predict_logits(net, x, "flip-translate", pad="constant")
    assert torch.allclose(c, 0.5 * pair[0] + 0.25 * (pair[1] + pair[2]), atol=1e-5)
    assert not torch.allclose(c, zeros, atol=1e-5)


def test_run_epoch_trains_and_evaluates():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # learnable: sign of the red channel's mean
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    net = _net()
    opt = build_optimizer(net, "adam", lr=0.05, momentum=0.9, nesterov=False, weight_decay=0)
    loss = nn.CrossEntropyLoss()
    first = run_epoch(net, batches, CPU, loss_fn=loss, trainer=Trainer(opt))
    for _ in range(15):
        last = run_epoch(net, batches, CPU, loss_fn=loss, trainer=Trainer(opt))
    assert first.steps == 4 and len(first.lrs) == 4 and first.n == 64
    assert last.loss < first.loss
    ev = run_epoch(net, batches, CPU, loss_fn=loss, collect=True)
    assert not net.training
    assert ev.logits.shape == (64, 3) and torch.equal(ev.targets, y)
    assert ev.accuracy == pytest.approx((ev.logits.argmax(1) == y).float().mean().item())
    assert ev.accuracy > 0.8


def test_run_epoch_stops_on_non_finite_loss():
    net = _net()
    opt = build_optimizer(net, "sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0)
    x = torch.randn(8, 3, 8, 8)
    batches = [(x, torch.zeros(8, dtype=torch.long)), (x * float("nan"), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(NonFiniteLossError) as info:
        run_epoch(net, batches, CPU, loss_fn=nn.CrossEntropyLoss(), trainer=Trainer(opt), step_offset=10)
    assert info.value.step == 12


def test_confusion_and_per_class():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    targets = torch.tensor([0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    assert per_class_accuracy(cm) == pytest.approx([0.5, 1.0, 2 / 3])


# ------------------------------------------------------------------------------ Muon


def test_orthogonalize_flattens_the_singular_values():
    from cifarlab.optim import orthogonalize

    torch.manual_seed(0)
    for shape in ((16, 72), (72, 16)):
        # badly conditioned on purpose: singular values spread over three decades
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
        k = min(shape)
        g = u[:, :k] @ torch.diag(torch.logspace(0, -3, k)) @ v[:, :k].T
        s = torch.linalg.svdvals(orthogonalize(g))
        # five steps do not converge exactly (by design): a condition number of 1000 comes
        # out below 4, every singular value within [0.3, 1.3]
        assert s.shape == (k,) and s.min() > 0.3 and s.max() < 1.3, s
        assert s.max() / s.min() < 4


def test_muon_groups_filters_and_keeps_their_norm_fixed():
    net = _net()
    opt = build_optimizer(net, "muon", lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3, bias_lr_scale=4, muon_lr=0.2, muon_momentum=0.6)
    groups = {g["name"]: g for g in opt.param_groups}
    assert [p.ndim for p in groups["filters"]["params"]] == [4] and groups["filters"]["muon"]
    assert groups["filters"]["lr"] == 0.2 and groups["filters"]["momentum"] == 0.6
    assert all(p.ndim == 2 for p in groups["weights"]["params"]) and groups["weights"]["momentum"] == 0.85
    assert groups["biases"]["lr"] == pytest.approx(0.4)
    x = torch.randn(32, 3, 8, 8)
    y = x.mean((2, 3)).argmax(1)  # learnable: the brightest channel
    before = net[0].weight.detach().clone()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    w = net[0].weight.detach()
    assert not torch.equal(w, before)
    # renormalised to sqrt(out) before each step, then moved by an lr-sized orthogonal update
    assert abs(w.norm().item() - 2.0) < 0.2 * 2
    assert losses[-1] < 0.5 * losses[0], losses
    state = opt.state_dict()
    again = build_optimizer(_net(), "muon", lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3, bias_lr_scale=4, muon_lr=0.2, muon_momentum=0.6)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


def test_muon_ns_steps_reaches_the_update_and_old_states_still_load():
    from cifarlab.config import resolve_config
    from cifarlab.optim import NS_STEPS, orthogonalize

    def first_step(ns_steps: int) -> tuple[torch.Tensor, torch.optim.Optimizer, nn.Module]:
        torch.manual_seed(0)
        net = _net()
        opt = build_optimizer(
            net, "muon", lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.0, muon_lr=0.2, muon_ns_steps=ns_steps
        )
        nn.functional.cross_entropy(net(torch.randn(8, 3, 8, 8)), torch.arange(8) % 3).backward()
        opt.step()
        return net[0].weight.detach().clone(), opt, net

    w3, opt3, _ = first_step(3)
    w5, _, _ = first_step(5)
    assert {g["ns_steps"] for g in opt3.param_groups} == {3}
    # 3 and 5 quintic steps give different (both valid) updates; the config default is 5
    assert not torch.allclose(w3, w5)
    g = torch.randn(16, 72)
    assert not torch.allclose(orthogonalize(g, 3), orthogonalize(g, 5))
    assert resolve_config(preset=None, overrides={}).muon_ns_steps == NS_STEPS == 5
    with pytest.raises(CifarlabError):
        resolve_config(preset=None, overrides={"muon_ns_steps": 0})
    # a state saved before the key existed: its groups lack ns_steps, steps use the default
    state = opt3.state_dict()
    for group in state["param_groups"]:
        del group["ns_steps"]
    _, again, net = first_step(3)
    again.load_state_dict(state)
    before = net[0].weight.detach().clone()
    nn.functional.cross_entropy(net(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    again.step()
    assert "ns_steps" not in again.param_groups[0] and not torch.equal(net[0].weight, before)


def _perturb(net: nn.Module, amount: float) -> None:
    """Move every float tensor (weights and BN running statistics) by ``amount``."""
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.add_(amount)


def test_lookahead_decay_grows_cubically_to_airbench94s_final_pull():
    from cifarlab.optim import Lookahead

    la = Lookahead(_net(), total_steps=100)
    assert la.decay(0) == 0.0
    assert la.decay(50) == pytest.approx(0.95**5 * 0.125)
    assert la.decay(100) == pytest.approx(0.95**5)
    assert la.decay(150) == pytest.approx(0.95**5)  # a resumed, lengthened run stays bounded
    with pytest.raises(ValueError):
        Lookahead(_net(), total_steps=0)


def test_lookahead_pulls_every_fifth_step_and_finishes_on_the_slow_weights():
    from cifarlab.optim import Lookahead

    net = _net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    la = Lookahead(net, total_steps=10)
    _perturb(net, 1.0)
    la.after_step(4)  # not a multiple of 5: nothing moves
    assert torch.equal(net[0].weight, start["0.weight"] + 1.0)
    la.after_step(5)
    d = la.decay(5)  # 0.95**5 / 8
    for key, value in net.state_dict().items():
        if value.is_floating_point():  # running_mean/var included
            expected = start[key] + (1 - d) * 1.0
            assert torch.allclose(value, expected), key
            assert torch.equal(la.slow[key], value)
        else:  # num_batches_tracked is left alone
            assert torch.equal(value, start[key])
    _perturb(net, 2.0)
    la.finish()  # back onto the slow weights, not a blend with the last perturbation
    for key, slow in la.slow.items():
        assert torch.equal(net.state_dict()[key], slow)
        assert torch.allclose(slow, start[key] + (1 - d)), key


def test_lookahead_state_round_trips_and_rejects_another_model():
    from cifarlab.optim import Lookahead

    net = _net()
    la = Lookahead(net, total_steps=10)
    _perturb(net, 0.5)
    la.after_step(10)
    state = {k: v.clone() for k, v in la.state_dict()["slow"].items()}
    other = Lookahead(_net(), total_steps=10)
    other.load_state_dict({"slow": state})
    for key, value in state.items():
        assert torch.equal(other.slow[key], value)
    small = Lookahead(nn.Linear(2, 2), total_steps=10)
    with pytest.raises(ValueError, match="does not match"):
        small.load_state_dict({"slow": state})


def test_run_epoch_without_a_loss_only_predicts():
    # Plain prediction (cifarlab predict): placeholder labels, no loss computed at all.
    net = _net()
    x = torch.randn(10, 3, 8, 8)
    batches = [(x[:6], torch.zeros(6, dtype=torch.long)), (x[6:], torch.zeros(4, dtype=torch.long))]
    res = run_epoch(net, batches, CPU, collect=True)
    assert res.n == 10 and res.steps == 2 and res.lrs == []
    assert res.loss != res.loss  # nan: there is no loss to report
    with torch.inference_mode():
        assert torch.allclose(res.logits, net.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="loss function"):
        run_epoch(net, batches, CPU, trainer=Trainer(build_optimizer(net, "sgd", lr=0.1, momentum=0, nesterov=False, weight_decay=0)))


def test_progress_prints_plain_lines_when_not_on_a_terminal(monkeypatch):
    import io

    from cifarlab import progress as progress_mod
    from cifarlab.progress import Progress, progress_mode

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_mode(None, Tty()) == "bar" and progress_mode(None, io.StringIO()) == "lines"
    assert progress_mode(True, io.StringIO()) == "bar" and progress_mode(False, Tty()) == "off"
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])  # start, then one reading per update
    monkeypatch.setattr(progress_mod, "_now", lambda: next(clock))
    out = io.StringIO()
    p = Progress("lines", 8, "epoch 1/2", stream=out)
    for step in range(1, 5):
        p.update(step, 16 * step, torch.tensor(2.0 * 16 * step), torch.tensor(8 * step), 0.1)
    p.close()
    lines = out.getvalue().splitlines()
    # A line only once 30 s have passed since the last one: at steps 2 (31 s) and 4 (62 s).
    assert len(lines) == 2
    assert lines[0] == "epoch 1/2  step 2/8  loss 2.0000  acc 50.00%  1 img/s  ETA 1m33s"
    assert lines[1].startswith("epoch 1/2  step 4/8 ") and "ETA 1m02s" in lines[1]
    monkeypatch.undo()
    silent = io.StringIO()
    q = Progress("off", 8, stream=silent)
    q.update(1, 16, torch.tensor(1.0), torch.tensor(1), None)
    assert silent.getvalue() == ""
