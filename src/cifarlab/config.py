"""Run configuration: one frozen dataclass, validated at the boundary.

Sources are merged in this order, later ones winning: dataclass defaults, a preset
(``configs/<name>.toml`` shipped in the package), a user's ``--config FILE``, then CLI
flags. Every key and value is checked before any data is touched; problems raise
:class:`CifarlabError` with one line that names the key. The resolved config is written
next to the run's outputs as ``config.toml`` so a run can be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from cifarlab.errors import CifarlabError

DATASETS = ("cifar10", "imagefolder", "synthetic")
NORMS = ("batch", "group", "layer")
OPTIMIZERS = ("sgd", "adam", "adamw", "muon")
SCHEDULERS = ("onecycle", "plateau", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
TTA_MODES = ("none", "flip", "flip-translate")
ANNEALS = ("cos", "linear")
CHANNELS_LAST = ("auto", "on", "off")
GEMM_CONVS = ("auto", "on", "off")
# CAM methods of the explanations (pytorch-grad-cam names, see explain/cams.py); the first is the default.
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Field comments give units and meaning."""

    preset: str | None = None  # name of the preset this run started from (informational)
    # --- data
    dataset: str = "cifar10"
    data: str = "data"  # root folder: holds cifar-10-batches-py/, or train/ and test/
    num_classes: int = 10  # synthetic data only; other sources take it from the data
    synthetic_train: int = 5000
    synthetic_test: int = 1000
    limit_train: int | None = None  # class-balanced subset, for quick experiments
    limit_test: int | None = None
    # Hold out N class-balanced training images and evaluate on them instead of the test
    # split: tune a recipe here, keep the test split for final figures. 0 = off.
    holdout: int = 0
    augment: str = "crop:4,flip,cutout:16"  # see AugmentSpec.parse
    # Train early epochs on downscaled images, e.g. "24:0.5" = first half at 24 px (about
    # 2x the images/s); see data/resize.py. Evaluation is always at full size.
    progressive_resize: str = "none"
    # --- model
    model: str = "resnet18"
    norm: str = "batch"
    dropout: float = 0.0
    # Models with a patch-whitening stem (fast, fast-long) only: the floor added to each
    # patch-covariance eigenvalue before the 1/sqrt scaling. Unset = the model's default
    # (airbench94's 5e-4, tuned on the original CIFAR-10 files).
    whiten_eps: float | None = None
    # --- optimisation
    epochs: int = 20
    batch_size: int = 512
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    lr: float | str = 0.1  # peak LR (One-Cycle max LR); "auto" runs the LR finder first
    momentum: float = 0.9  # SGD momentum / Adam beta1
    nesterov: bool = True
    weight_decay: float = 5e-4
    # Norm-layer biases of BN nets train well with a much larger LR (airbench uses 64x);
    # applied to 1-d params (biases, norm affine), whose weight decay is divided by it so
    # the per-step decay lr * weight_decay stays the same (airbench's bias_scaler).
    bias_lr_scale: float = 1.0
    label_smoothing: float = 0.0
    scheduler: str = "onecycle"
    pct_start: float = 0.25  # One-Cycle: fraction of steps spent warming up
    anneal: str = "cos"  # One-Cycle shape; "linear" gives the speed-runs' triangle
    div_factor: float = 25.0  # One-Cycle: initial LR = lr / div_factor
    final_div_factor: float = 1e4  # One-Cycle: final LR = initial / final_div_factor
    plateau_factor: float = 0.1  # ReduceLROnPlateau on test loss
    plateau_patience: int = 3
    # optimizer = "muon": the conv filters train with orthogonalised updates at this peak
    # LR (an angle per step: the filters' norm is held fixed) and momentum; everything
    # else uses SGD with lr/momentum/weight_decay/bias_lr_scale above (lr = "auto" sweeps
    # that LR with the filters held at muon_lr).
    muon_lr: float = 0.24
    muon_momentum: float = 0.6
    # Newton-Schulz steps per Muon update: 5 pushes the update's singular values into about
    # [0.7, 1.2]; airbench94_muon runs 3, which leaves the weakest directions smaller.
    muon_ns_steps: int = 5
    # Lookahead of the weights (airbench94's): every 5 steps the model is pulled back onto
    # a slow copy, weakly early and strongly at the end; the run ends on the slow weights.
    lookahead: bool = False
    # --- evaluation
    tta: str = "none"  # test-time augmentation at evaluation
    # Evaluate after every N-th epoch and always after the last; 0 = after the last only.
    # A 10k-image pass costs about 6% of a fast-net epoch on a CPU: time-budgeted runs skip it.
    eval_every: int = 1
    # CAM method of the report's galleries (one of CAM_METHODS); `cifarlab report --cam` overrides it.
    cam: str = "gradcam"
    # --- system
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 where the hardware runs it fast, else fp32
    channels_last: str = "auto"
    # Convs onto small maps (ResNet18's layer4, the fast net's last group) as im2col
    # matmuls instead of oneDNN's kernels (cifarlab/gemm_conv.py); auto = on where that
    # was measured to be faster: bf16 on CPUs with AMX, and not under compile.
    gemm_convs: str = "auto"
    compile: bool = False
    seed: int = 0
    out: str | None = None  # run directory; default runs/<preset or model>-<timestamp>
    log_every: int = 20  # steps between host syncs for the progress bar
    # Also log to TensorBoard in <out>/tb/ (cifarlab/tblog.py; needs the tensorboard extra).
    tensorboard: bool = False
    # --- robustness
    save_every_steps: int = 0  # also checkpoint every N steps mid-epoch; 0 = epoch ends only
    stop_on_stall: bool = True  # stop (else only warn) when training is stuck at chance
    skip_bad: bool = False  # image folders: train without unreadable files (refused above 1%)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (None values kept)."""
        return dataclasses.asdict(self)


# Allowed values for string fields that take one of a fixed set.
_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "norm": NORMS,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "precision": PRECISIONS,
    "device": DEVICES,
    "tta": TTA_MODES,
    "anneal": ANNEALS,
    "channels_last": CHANNELS_LAST,
    "gemm_convs": GEMM_CONVS,
    "cam": CAM_METHODS,
}

# (low, high, low_inclusive) bounds for numeric fields; high None = unbounded.
_BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "num_classes": (2, 10_000, True),
    "synthetic_train": (1, None, True),
    "synthetic_test": (1, None, True),
    "limit_train": (1, None, True),
    "limit_test": (1, None, True),
    "holdout": (0, None, True),
    "dropout": (0.0, 0.999, True),
    "whiten_eps": (0.0, 10.0, False),
    "epochs": (1, 100_000, True),
    "batch_size": (1, 1_000_000, True),
    "eval_batch_size": (1, 1_000_000, True),
    "lr": (0.0, 1e4, False),
    "momentum": (0.0, 0.999999, True),
    "weight_decay": (0.0, 10.0, True),
    "bias_lr_scale": (0.0, 1e4, False),
    "label_smoothing": (0.0, 0.999, True),
    "pct_start": (0.0, 1.0, False),
    "div_factor": (1.0, 1e9, True),
    "final_div_factor": (1.0, 1e12, True),
    "plateau_factor": (0.0, 1.0, False),
    "plateau_patience": (0, 10_000, True),
    "muon_lr": (0.0, 10.0, False),
    "muon_momentum": (0.0, 0.999, True),
    "muon_ns_steps": (1, 20, True),
    "seed": (0, 2**63 - 1, True),
    "log_every": (1, 1_000_000, True),
    "eval_every": (0, 1_000_000, True),
    "save_every_steps": (0, 1_000_000_000, True),
}

_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def field_names() -> tuple[str, ...]:
    """Names of all config keys, in declaration order."""
    return tuple(f.name for f in fields(TrainConfig))


def _coerce(key: str, value: Any) -> Any:
    """Check one value against its field's annotation; return it (ints widen to float)."""
    hint = _FIELD_TYPES[key]
    args = typing.get_args(hint) or (hint,)
    allowed = tuple(a for a in args if a is not type(None))
    if value is None:
        if type(None) in args:
            return None
        raise CifarlabError(f"config key '{key}' must not be empty")
    # bool is an int subclass in Python: never let True stand in for a number or vice versa.
    if isinstance(value, bool):
        if bool in allowed:
            return value
        raise CifarlabError(f"config key '{key}' must be {_type_words(allowed)}, got {value!r}")
    if float in allowed and isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise CifarlabError(f"config key '{key}' must be a finite number, got {value!r}")
        return value
    if int in allowed and isinstance(value, int):
        return value
    if str in allowed and isinstance(value, str):
        return value
    raise CifarlabError(f"config key '{key}' must be {_type_words(allowed)}, got {value!r}")


def _type_words(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_value(key: str, value: Any) -> None:
    if value is None:
        return
    if key in _CHOICES and value not in _CHOICES[key]:
        raise CifarlabError(
            f"config key '{key}' must be one of {', '.join(_CHOICES[key])}; got {value!r}"
        )
    if key == "lr" and isinstance(value, str):
        if value != "auto":
            raise CifarlabError(f"config key 'lr' must be a positive number or 'auto'; got {value!r}")
        return
    if key in _BOUNDS and isinstance(value, (int, float)):
        low, high, low_inclusive = _BOUNDS[key]
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value > high):
            bound = f">= {low}" if low_inclusive else f"> {low}"
            if high is not None:
                bound += f" and <= {high}"
            raise CifarlabError(f"config key '{key}' must be {bound}; got {value!r}")


def validate_mapping(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Reject unknown keys and bad values in ``values``; return them coerced.

    ``source`` names where the values came from (a file path, "command line"), so the
    one-line error tells the user what to fix.
    """
    known = set(field_names())
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            hint = _closest(key, known)
            raise CifarlabError(
                f"unknown config key '{key}' in {source}" + (f" (did you mean '{hint}'?)" if hint else "")
            )
        if isinstance(value, (dict, list)):
            raise CifarlabError(f"config key '{key}' in {source} must be a single value, not a table or list")
        try:
            coerced = _coerce(key, value)
            _check_value(key, coerced)
        except CifarlabError as exc:
            raise CifarlabError(f"{exc} (in {source})") from None
        out[key] = coerced
    return out


def _closest(key: str, known: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return match[0] if match else None


def _cross_check(cfg: TrainConfig) -> None:
    """Checks that involve more than one key."""
    if cfg.optimizer != "sgd" and cfg.nesterov and cfg.momentum == 0:
        pass  # nesterov is ignored for Adam-style optimizers
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise CifarlabError("config: nesterov=true needs momentum > 0")
    if cfg.scheduler == "plateau" and cfg.eval_every != 1:
        raise CifarlabError("config: scheduler='plateau' steps on every epoch's test loss; it needs eval_every = 1")



def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML config file; a missing or malformed file is a one-line error."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CifarlabError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CifarlabError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise CifarlabError(f"cannot read config file {path}: {exc.strerror}") from None


def list_presets() -> list[str]:
    """Names of the presets shipped with the package (``configs/*.toml``)."""
    root = resources.files("cifarlab") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_values(name: str) -> dict[str, Any]:
    """The validated values of preset ``name``."""
    if name not in list_presets():
        raise CifarlabError(f"unknown preset '{name}'; available: {', '.join(list_presets())}")
    ref = resources.files("cifarlab") / "configs" / f"{name}.toml"
    with ref.open("rb") as f:
        values = tomllib.load(f)
    values = validate_mapping(values, f"preset {name}")
    values["preset"] = name
    return values


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults < preset < config file < overrides into a validated TrainConfig."""
    merged: dict[str, Any] = {}
    if preset is not None:
        merged.update(preset_values(preset))
    if config_file is not None:
        file_values = read_toml(config_file)
        file_preset = file_values.pop("preset", None)
        if file_preset is not None and preset is None:
            if not isinstance(file_preset, str):
                raise CifarlabError(f"config key 'preset' in {config_file} must be a string")
            merged.update(preset_values(file_preset))
        merged.update(validate_mapping(file_values, str(config_file)))
    if overrides:
        merged.update(validate_mapping(overrides, "command line"))
    cfg = TrainConfig(**merged)
    _cross_check(cfg)
    return cfg


# Keys older runs stored that no longer exist, with the only value they ever took effect
# with: ``ema`` was accepted but never implemented, so a stored 0.0 (the default) is
# dropped when such a run is read back; anything else is still an error.
_RETIRED_KEYS = {"ema": 0.0}


def config_from_dict(values: Mapping[str, Any], source: str = "checkpoint") -> TrainConfig:
    """Rebuild a TrainConfig from a stored dict (checkpoint or config.toml)."""
    values = {k: v for k, v in values.items() if not (k in _RETIRED_KEYS and v == _RETIRED_KEYS[k])}
    return TrainConfig(**validate_mapping(values, source))


def to_toml(cfg: TrainConfig) -> str:
    """Serialise a config as flat TOML. None values are omitted (TOML has no null)."""
    lines = ["# Resolved cifarlab config: `cifarlab train --config this-file` reruns it."]
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
