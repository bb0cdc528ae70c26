"""The robustness building blocks in isolation: signal deferral, the stall detector, the
finiteness check, checkpoint RNG state, the disk-space estimate, fault-injection parsing."""

from __future__ import annotations

import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from cifarlab import _faults
from cifarlab.checkpoint import NonFiniteStateError, read_checkpoint, restore_rng_state, rng_state, save_checkpoint
from cifarlab.errors import CifarlabError
from cifarlab.guards import (
    Chance,
    StopSignals,
    check_disk_space,
    estimate_checkpoint_bytes,
    is_stalled,
    nonfinite_entries,
)


def test_stop_signals_defers_sigint_and_sigterm_and_restores_handlers():
    # Python's own Ctrl-C handler, whatever pytest inherited: a shell's background job
    # (`cmd &`) starts with SIGINT ignored, and then no KeyboardInterrupt could be seen.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        notes = []
        with StopSignals(notify=notes.append) as stop:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, not a KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # a second one is deferred as well
            assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
        assert len(notes) == 2 and "again" in notes[1]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C works normally again afterwards
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_chance_levels():
    balanced = Chance.of_labels(torch.arange(100) % 4, 4)
    assert balanced.loss == pytest.approx(math.log(4)) and balanced.accuracy == pytest.approx(0.25)
    skewed = Chance.of_labels(torch.tensor([0] * 90 + [1] * 10), 2)
    assert skewed.accuracy == pytest.approx(0.9) and skewed.loss < math.log(2)


@pytest.mark.parametrize(
    "epoch, loss, acc, stalled",
    [
        (2, math.log(10), 0.10, True),  # collapsed to a uniform prediction
        (3, 2.31, 0.11, True),
        (2, 950.0, 0.10, True),  # blown-up but finite weights, still guessing
        (1, math.log(10), 0.10, False),  # too early to judge
        (2, 2.0, 0.25, False),  # learning, slowly
        (2, 2.30, 0.30, False),  # accuracy well above chance
        (2, 1.2, 0.11, False),  # loss clearly below chance
        (2, math.nan, 0.10, False),  # NaN is the divergence check's job
    ],
)
def test_stall_detector(epoch, loss, acc, stalled):
    chance = Chance.of_labels(torch.arange(1000) % 10, 10)
    assert is_stalled(epoch, loss, acc, chance) is stalled


def test_nonfinite_entries_names_the_bad_tensors():
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan]), "c": torch.tensor([math.inf]), "i": torch.arange(3)}
    assert nonfinite_entries(tensors) == ["b", "c"]
    assert nonfinite_entries({"a": torch.zeros(2)}) == []


def test_save_checkpoint_refuses_nonfinite_weights_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    good = {"model": {"name": "x", "kwargs": {}}, "state_dict": {"w": torch.ones(2)}, "classes": [], "mean": [], "std": []}
    save_checkpoint(path, good)
    bad = dict(good, state_dict={"w": torch.tensor([1.0, math.nan])})
    with pytest.raises(NonFiniteStateError, match="w"):
        save_checkpoint(path, bad)
    momentum = dict(good, optimizer={"state": {0: {"momentum_buffer": torch.tensor([math.inf])}}, "param_groups": []})
    with pytest.raises(NonFiniteStateError, match="momentum_buffer"):
        save_checkpoint(path, momentum)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "c.pt"
    payload = {"model": {"name": "x", "kwargs": {}}, "state_dict": {}, "classes": [], "mean": [], "std": [], "rng": rng_state()}
    save_checkpoint(path, payload)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(read_checkpoint(path)["rng"])  # weights_only=True inside
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_disk_space_check(tmp_path, monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights
    est = estimate_checkpoint_bytes(model)
    assert est >= 3 * 4_004_000
    usage = type("usage", (), {"total": 10**12, "used": 0, "free": 3 * est - 1})
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage)
    with pytest.raises(CifarlabError, match="not enough disk space") as err:
        check_disk_space(tmp_path / "not" / "yet" / "there", model)
    assert "MiB" in str(err.value) and "\n" not in str(err.value)
    usage.free = 3 * est
    check_disk_space(tmp_path / "run", model)


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.setenv(_faults.ENV, "kill@step=7,int@save=2/r1, enospc@save=3")
    assert _faults._plan() == [("kill", "step", 7, None), ("int", "save", 2, 1), ("enospc", "save", 3, None)]
    monkeypatch.setenv(_faults.ENV, "explode@step=1")
    with pytest.raises(ValueError, match="ACTION@POINT"):
        _faults._plan()
    monkeypatch.delenv(_faults.ENV)
    _faults.at_step(7)  # unset: nothing happens


def test_gradscaler_skipped_steps_are_counted_without_a_sync_per_step():
    # The fp16 path runs on CUDA only; the counting logic is device-agnostic, so exercise
    # it with the CPU GradScaler: inf gradients at steps 1 and 4 make it skip those steps.
    from cifarlab.trainhooks import AmpSkips

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skips = AmpSkips(scaler)
    for step in range(1, 7):
        x = torch.randn(4, 3)
        if step in (1, 4):
            x[0, 0] = math.inf
        opt.zero_grad()
        scaler.scale(model(x).sum()).backward()
        scaler.step(opt)
        scaler.update()
        skips.after_step()
    assert skips.count() == 2
