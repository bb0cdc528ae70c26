"""Grad-CAM (Selvaraju et al. 2017) through Captum's ``LayerGradCam``.

For a target class c and a layer with activations A (K channels, h x w), Grad-CAM is
``relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of dY_c/dA_k. Captum computes
exactly that (``relu_attributions=True``); here it is batched, run on the model's own
device, upsampled to the image size and scaled per image to [0, 1].

Captum registers forward hooks on the layer for one call and removes them in a
``finally``; nothing here adds hooks of its own, so the model comes back as it went in.
"""

from __future__ import annotations

import torch
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
    """``(name, module)`` of the Grad-CAM layer: ``name`` or else the model's ``cam_layer``.

    An unknown name is a user error that lists the available layers.
    """
    model = unwrap(model)
    name = name or getattr(model, "cam_layer", None)
    if not name:
        raise CifarlabError(
            f"model {type(model).__name__} names no default Grad-CAM layer; pass --layer, one of: "
            + ", ".join(candidate_layers(model))
        )
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise CifarlabError(f"unknown layer '{name}'; available conv layers: " + ", ".join(candidate_layers(model)))
    return name, modules[name]


def layer_grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, str]:
    """Raw Grad-CAM maps at the layer's resolution: ``(B, h, w)`` float32 on the CPU, >= 0.

    ``images`` are normalised model inputs (B, 3, H, W); ``targets`` the class to explain
    per image. Runs in eval mode (BatchNorm uses running stats, as at test time) and
    in fp32; the model's train/eval mode is restored. Returns the maps and the layer name.
    """
    from captum.attr import LayerGradCam

    model = unwrap(model)
    name, module = resolve_layer(model, layer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cam = LayerGradCam(model, module)
    out = []
    try:
        # Grad-CAM needs autograd even when the caller evaluates under inference_mode/no_grad;
        # the clones turn inference tensors into ones autograd may save.
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size].to(device).clone()
                t = targets[i : i + batch_size].to(device).long().clone()
                a = cam.attribute(x, target=t, relu_attributions=True)
                if a.dim() != 4:
                    raise CifarlabError(
                        f"layer '{name}' does not output an image-shaped map (got {tuple(a.shape)}); "
                        f"choose a conv layer: {', '.join(candidate_layers(model))}"
                    )
                out.append(a.detach().float()[:, 0].cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 0, 0), name
    return torch.cat(out), name


def upsample_and_normalise(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample (B, h, w) maps to ``size`` and scale each to [0, 1] by its max.

    Dividing by the max (not min-max) keeps zero meaning "no evidence for the class"; a
    map that is all zero (no positive evidence anywhere) stays all zero.
    """
    from captum.attr import LayerAttribution

    if maps.numel() == 0:
        return maps.new_zeros((maps.shape[0], *size))
    up = LayerAttribution.interpolate(maps.unsqueeze(1), size, interpolate_mode="bilinear")[:, 0]
    up = up.clamp_min(0)  # bilinear interpolation of non-negative maps is non-negative; guard rounding
    peak = up.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up))


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, str]:
    """Grad-CAM maps at image resolution: ``(B, H, W)`` float32 in [0, 1] on the CPU, and the layer name."""
    maps, name = layer_grad_cam(model, images, targets, layer, batch_size)
    return upsample_and_normalise(maps, tuple(images.shape[-2:])), name
