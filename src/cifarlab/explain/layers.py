"""Which layer a CAM explains: unwrapping DDP/compile wrappers and resolving layer names."""

from __future__ import annotations

from torch import nn

from cifarlab.errors import CifarlabError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and/or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def candidate_layers(model: nn.Module) -> list[str]:
    """Names a user can pass as ``--layer``: the stages of ``model.features`` and every conv."""
    names = []
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        names += [f"features.{n}" for n, _ in features.named_children()]
    names += [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in names]
    return names


def resolve_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the CAM layer: ``name`` or else the model's ``cam_layer``.

    An unknown name is a user error that lists the available layers.
    """
    model = unwrap(model)
    name = name or getattr(model, "cam_layer", None)
    if not name:
        raise CifarlabError(
            f"model {type(model).__name__} names no default CAM layer; pass --layer, one of: "
            + ", ".join(candidate_layers(model))
        )
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise CifarlabError(f"unknown layer '{name}'; available conv layers: " + ", ".join(candidate_layers(model)))
    return name, modules[name]
