"""Model summary via torchinfo: layer table, parameter count, MACs per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSummary:
    """torchinfo's table plus the two numbers people quote."""

    text: str
    params: int  # all parameters, frozen ones (the whitening stem) included
    trainable_params: int
    macs_per_image: int


def model_summary(model: nn.Module, image_size: int = 32, depth: int = 3) -> ModelSummary:
    """Summarise ``model`` on one 3x``image_size``² image (CPU, eval mode, no grads)."""
    from torchinfo import summary

    was_training = model.training
    device = next(model.parameters()).device
    stats = summary(
        model,
        input_size=(1, 3, image_size, image_size),
        depth=depth,
        device=device,
        verbose=0,
        col_names=("output_size", "num_params", "mult_adds"),
        mode="eval",
    )
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = getattr(model, "spec", {}).get("name", type(model).__name__)
    text = (
        f"{stats}\n"
        f"model {name}: {params:,} parameters ({trainable:,} trainable), "
        f"{stats.total_mult_adds / 1e6:,.1f} M MACs per 32x32 image"
    )
    return ModelSummary(text=text, params=params, trainable_params=trainable, macs_per_image=int(stats.total_mult_adds))
