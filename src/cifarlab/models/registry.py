"""Model names -> constructors, and the one entry point :func:`create_model`.

The registry is a read-only mapping written out in full below: adding a model means
adding a line here, and nothing can register models behind the CLI's back at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from cifarlab.errors import CifarlabError
from cifarlab.models.fastnet import WHITEN_EPS, FastNet
from cifarlab.models.norm import NORMS
from cifarlab.models.resnet import resnet18, resnet34


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named architecture (a registry entry).

    Attributes:
        build: called as ``build(num_classes=..., norm=..., dropout=..., **extra)``.
        defaults: the extra keyword arguments the model accepts beyond ``num_classes``,
            ``norm`` and ``dropout``, with their defaults (immutable values only).
        summary: one line for help texts.
    """

    build: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    summary: str


_NO_EXTRAS: Mapping[str, Any] = MappingProxyType({})

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "resnet18": ModelSpec(resnet18, _NO_EXTRAS, "CIFAR ResNet18, 11.2M parameters"),
        "resnet34": ModelSpec(resnet34, _NO_EXTRAS, "CIFAR ResNet34, 21.3M parameters"),
        "fast": ModelSpec(
            FastNet,
            MappingProxyType(
                {"widths": (64, 256, 256), "depth": 2, "residual": False, "whiten_eps": WHITEN_EPS}
            ),
            "airbench94-style: whitening stem + 6 convs, 2.0M parameters",
        ),
        "fast-long": ModelSpec(
            FastNet,
            # Wider and one conv deeper per group with a residual, after airbench96
            # (which uses 128/512/512); 384 in the middle keeps it under 10M parameters.
            MappingProxyType(
                {"widths": (128, 384, 512), "depth": 3, "residual": True, "whiten_eps": WHITEN_EPS}
            ),
            "airbench96-style: whitening stem + 9 residual convs, 9.9M parameters",
        ),
    }
)


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(MODELS)


def create_model(
    name: str,
    num_classes: int = 10,
    norm: str = "batch",
    dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    The returned module has ``features`` (images -> feature map), ``head`` (feature map
    -> logits: pool, flatten, dropout, linear), ``cam_layer`` (a ``named_modules`` name
    whose output is at least 8x8 on 32x32 inputs) and ``spec``, a JSON/TOML-friendly dict
    ``{"name": ..., "kwargs": {...}}`` with every architecture argument resolved, such that
    ``create_model(spec["name"], **spec["kwargs"])`` rebuilds the same architecture.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the output layer.
        norm: one of ``"batch"``, ``"group"``, ``"layer"``.
        dropout: drop probability in the head, in [0, 1).
        **kwargs: model-specific architecture options (see ``MODELS[name].defaults``).

    Raises:
        CifarlabError: unknown name, unknown norm, out-of-range values, or keyword
            arguments the model does not accept.
    """
    entry = MODELS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise CifarlabError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CifarlabError(f"num_classes must be a positive integer; got {num_classes!r}")
    if norm not in NORMS:
        raise CifarlabError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    if (
        not isinstance(dropout, (int, float))
        or isinstance(dropout, bool)
        or not math.isfinite(dropout)
        or not 0.0 <= dropout < 1.0
    ):
        raise CifarlabError(f"dropout must be a number in [0, 1); got {dropout!r}")
    unknown = sorted(set(kwargs) - set(entry.defaults))
    if unknown:
        accepted = ", ".join(entry.defaults) or "none beyond num_classes, norm, dropout"
        raise CifarlabError(
            f"model {name!r} got unexpected option(s): {', '.join(unknown)}; accepted: {accepted}"
        )
    arch = {**entry.defaults, **kwargs}
    dropout = float(dropout)
    model = entry.build(num_classes=num_classes, norm=norm, dropout=dropout, **arch)
    model.spec = {
        "name": name,
        "kwargs": _plain({"num_classes": num_classes, "norm": norm, "dropout": dropout, **arch}),
    }
    return model


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so the spec round-trips through JSON/TOML unchanged."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
