"""Which layers the demo offers for Grad-CAM: the model's default, then its stages.

A "stage" is a child of ``model.features`` (or of the model, for one without
``features``) that is a block of layers or an activation: the outputs the architecture
is built from (ResNet's stem and layer1..4, the fast net's whitening activation and conv
groups). Bare convolutions, norms and pools are left out: a pre-activation linear map's
per-channel offsets leak into Grad-CAM as a flat bias (see ``models.fastnet``). Only maps
of at least :data:`MIN_MAP` pixels a side at the model's input size are kept: a smaller
map says little about where in the image the evidence is.
"""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.data.dataset import IMAGE_SIZE
from cifarlab.errors import CifarlabError
from cifarlab.explain.layers import resolve_layer, unwrap

MIN_MAP = 4  # smallest map side (pixels) worth explaining


def cam_layers(model: nn.Module, size: int = IMAGE_SIZE) -> list[str]:
    """Names (as in ``named_modules()``) of the layers to offer: the default Grad-CAM layer
    first, then the other stages with maps of at least ``MIN_MAP`` x ``MIN_MAP``, in
    forward order. Found by one forward pass of a blank image with shape-recording hooks."""
    model = unwrap(model)
    stages = _stages(model)
    try:
        default = resolve_layer(model, None)[0]
    except CifarlabError:
        default = None  # a model without a cam_layer: the deepest stage with a big enough map
    watched = dict(stages)
    if default is not None:
        watched[default] = dict(model.named_modules())[default]
    shapes = _output_shapes(model, watched, size)
    ok = [name for name in watched if _is_map(shapes.get(name))]
    if default is None:
        if not ok:
            raise CifarlabError(f"model {type(model).__name__} has no layer with a map of at least {MIN_MAP}x{MIN_MAP} to explain")
        default = ok[-1]
    return [default] + [name for name, _ in stages if name in ok and name != default]


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    features = getattr(model, "features", None)
    parent, prefix = (features, "features.") if isinstance(features, nn.Module) else (model, "")
    return [(prefix + name, m) for name, m in parent.named_children() if _is_stage(m)]


def _is_stage(module: nn.Module) -> bool:
    is_block = any(True for _ in module.children())
    is_activation = type(module).__module__ == nn.ReLU.__module__  # torch.nn.modules.activation
    return is_block or is_activation


def _is_map(shape) -> bool:
    return shape is not None and len(shape) == 4 and min(shape[-2:]) >= MIN_MAP


def _output_shapes(model: nn.Module, modules: dict[str, nn.Module], size: int) -> dict[str, tuple[int, ...]]:
    """The output shape of each watched module for one blank (1, 3, size, size) input."""
    shapes: dict[str, tuple[int, ...]] = {}
    param = next(model.parameters())
    handles = []
    for name, module in modules.items():
        def record(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes
