"""Config: presets load, merge order holds, bad keys/values are one-line errors."""

from __future__ import annotations

import math

import pytest

from cifarlab.config import (
    TrainConfig,
    config_from_dict,
    list_presets,
    preset_values,
    read_toml,
    resolve_config,
    to_toml,
)
from cifarlab.errors import CifarlabError


def test_presets_exist_and_validate():
    assert {"fast", "s11-resnet18-onecycle", "s8-resnet18-layernorm"} <= set(list_presets())
    for name in list_presets():
        cfg = resolve_config(preset=name)
        assert cfg.preset == name


def test_seed_presets_match_the_assignments():
    s11 = resolve_config(preset="s11-resnet18-onecycle")
    assert (s11.model, s11.norm, s11.batch_size, s11.scheduler, s11.epochs) == ("resnet18", "batch", 512, "onecycle", 20)
    assert s11.augment == "crop:4,flip,cutout:16"
    s8 = resolve_config(preset="s8-resnet18-layernorm")
    assert (s8.norm, s8.scheduler, s8.weight_decay, s8.dropout, s8.epochs) == ("layer", "plateau", 1e-3, 0.1, 40)
    assert s8.augment == "crop:4,cutout:16,rotate:5"


def test_merge_order_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "fast"\nepochs = 3\nlr = 0.5\n')
    cfg = resolve_config(config_file=f, overrides={"lr": 0.25})
    assert cfg.model == "fast"  # from the preset named in the file
    assert cfg.epochs == 3  # file beats preset
    assert cfg.lr == 0.25  # flag beats file


def test_ints_widen_to_float_but_bools_do_not():
    assert resolve_config(overrides={"lr": 1}).lr == 1.0
    with pytest.raises(CifarlabError, match="lr"):
        resolve_config(overrides={"lr": True})
    with pytest.raises(CifarlabError, match="epochs"):
        resolve_config(overrides={"epochs": 2.5})


@pytest.mark.parametrize(
    "overrides, word",
    [
        ({"epoch": 3}, "did you mean 'epochs'"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "finite"),
        ({"lr": "fast"}, "auto"),
        ({"optimizer": "rmsprop"}, "sgd, adam, adamw"),
        ({"norm": "instance"}, "norm"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"dropout": -0.1}, "dropout"),
        ({"dataset": "mnist"}, "dataset"),
        ({"seed": -1}, "seed"),
        ({"epochs": "ten"}, "epochs"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(overrides, word):
    with pytest.raises(CifarlabError, match=word) as info:
        resolve_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(CifarlabError, match="unknown preset"):
        resolve_config(preset="nope")
    with pytest.raises(CifarlabError, match="not found"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(CifarlabError, match="not valid TOML"):
        read_toml(bad)
    table = tmp_path / "table.toml"
    table.write_text("[model]\nname = 'x'\n")
    with pytest.raises(CifarlabError, match="single value"):
        resolve_config(config_file=table)


def test_toml_round_trip_is_exact(tmp_path):
    cfg = resolve_config(preset="fast", overrides={"out": 'runs/a "quoted" dir', "limit_train": 100})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = resolve_config(config_file=path)
    assert again == cfg
    # and through a dict, as checkpoints store it
    assert config_from_dict(cfg.to_dict()) == cfg


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]


def test_preset_values_are_validated():
    values = preset_values("fast")
    assert values["preset"] == "fast" and values["model"] == "fast"


def test_retired_ema_key_is_read_back():
    from cifarlab.config import config_from_dict, resolve_config

    cfg = resolve_config(overrides={"optimizer": "muon", "muon_lr": 0.3})
    stored = {**cfg.to_dict(), "ema": 0.0}  # what runs saved before 'ema' was removed
    assert config_from_dict({k: v for k, v in stored.items() if v is not None}) == cfg
    with pytest.raises(CifarlabError, match="ema"):
        config_from_dict({**{k: v for k, v in stored.items() if v is not None}, "ema": 0.99})
