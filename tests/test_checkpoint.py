"""Checkpoints: atomic writes, safe loading, self-description, safetensors export."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import cifarlab
from cifarlab.checkpoint import atomic_write, export_safetensors, read_checkpoint, save_checkpoint
from cifarlab.errors import CifarlabError


def _payload(model):
    return {
        "model": model.spec,
        "state_dict": model.state_dict(),
        "classes": ["a", "b", "c"],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "config": {"model": model.spec["name"], "lr": 0.1, "out": None},
        "dataset": {"name": "synthetic", "root": None, "synthetic": True},
        "epoch": 2,
        "metrics": {"test_acc": 0.5},
    }


@pytest.fixture
def model():
    torch.manual_seed(0)
    return cifarlab.create_model("resnet18", num_classes=3, norm="group", dropout=0.1)


def test_round_trip_rebuilds_identical_model(tmp_path, model):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _payload(model))
    # the plain safe loader reads it: nothing but tensors and primitives inside
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cifarlab"
    loaded, info = cifarlab.load_checkpoint(path)
    assert not loaded.training
    assert info["classes"] == ["a", "b", "c"] and info["model"]["name"] == "resnet18"
    assert info["model"]["kwargs"]["norm"] == "group" and "state_dict" not in info
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), loaded(x))


def test_safetensors_export_loads_the_same(tmp_path, model):
    save_checkpoint(tmp_path / "c.pt", _payload(model))
    export_safetensors(tmp_path / "model.safetensors", read_checkpoint(tmp_path / "c.pt"))
    loaded, info = cifarlab.load_checkpoint(tmp_path / "model.safetensors")
    assert info["classes"] == ["a", "b", "c"] and info["mean"] == [0.5, 0.5, 0.5]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_code_running_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "cifarlab", "payload": _Exploit()}, path)
    with pytest.raises(CifarlabError, match="refusing"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_flipped_checkpoints_are_clear_errors(tmp_path, model):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _payload(model))
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CifarlabError, match="corrupt|truncated"):
        read_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(CifarlabError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CifarlabError):
        read_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CifarlabError):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_not_a_cifarlab_dict(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CifarlabError, match="not a cifarlab checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"good"))

    def failing(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


def test_a_full_disk_inside_torch_save_surfaces_as_oserror(tmp_path):
    # Seen in CI: torch.save's zip writer gets ENOSPC, then its cleanup raises
    # RuntimeError("unexpected pos ...") which would otherwise escape as a traceback.
    import errno

    path = tmp_path / "f.pt"
    atomic_write(path, lambda f: f.write(b"good"))

    def torch_save_on_a_disk_that_fills(f):
        written = 0
        real_write = f.write

        def write(data):
            nonlocal written
            written += len(data)
            if written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(data)

        f.write = write
        torch.save({"w": torch.zeros(10_000)}, f)

    with pytest.raises(OSError) as info:
        atomic_write(path, torch_save_on_a_disk_that_fills)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]
