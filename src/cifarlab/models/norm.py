"""Normalisation layers for conv nets, selected by name.

The three kinds map onto two PyTorch classes:

* ``"batch"`` -> :class:`torch.nn.BatchNorm2d`;
* ``"group"`` -> :class:`torch.nn.GroupNorm` with :data:`GROUPS` groups;
* ``"layer"`` -> :class:`torch.nn.GroupNorm` with one group, i.e. every sample is
  normalised over all of its channels and positions. That is what the seed assignments
  (and e.g. Wu & He, "Group Normalization", 2018) call LayerNorm for conv nets; it avoids
  ``nn.LayerNorm``'s channels-last-only layout and keeps one affine pair per channel.
"""

from __future__ import annotations

from torch import nn

# NORMS (the accepted ``norm`` names) is defined once, in config, which validates them.
from cifarlab.config import NORMS
from cifarlab.errors import CifarlabError

#: Groups for ``"group"``. Wu & He (2018) found 32 groups best on ImageNet ResNets but
#: accuracy is flat between 8 and 32; 8 divides every width our models use (the fast
#: net's first group can be as narrow as 64 channels, leaving 8 channels per group, which
#: keeps per-group statistics stable on the 15x15 and 3x3 maps of a CIFAR net).
GROUPS = 8


def make_norm(
    kind: str,
    channels: int,
    *,
    eps: float | None = None,
    momentum: float = 0.1,
    learn_scale: bool = True,
) -> nn.Module:
    """Build the normalisation layer ``kind`` for a ``channels``-channel feature map.

    Args:
        kind: one of :data:`NORMS`.
        channels: number of channels of the input.
        eps: added to the variance; ``None`` keeps PyTorch's default (1e-5).
        momentum: running-statistics momentum in PyTorch's convention
            (``running = (1 - momentum) * running + momentum * batch``); BatchNorm only.
        learn_scale: when False the per-channel scale stays at 1 and is frozen
            (``requires_grad=False``), the speed-run style; the shift is always learnable.

    Raises:
        CifarlabError: unknown ``kind``, or ``"group"`` with ``channels`` not divisible by
            :data:`GROUPS`.
    """
    extra = {} if eps is None else {"eps": eps}
    if kind == "batch":
        layer: nn.Module = nn.BatchNorm2d(channels, momentum=momentum, **extra)
    elif kind == "group":
        if channels % GROUPS:
            raise CifarlabError(
                f"norm 'group' uses {GROUPS} groups, which does not divide {channels} channels; "
                f"use widths that are multiples of {GROUPS} or another norm"
            )
        layer = nn.GroupNorm(GROUPS, channels, **extra)
    elif kind == "layer":
        layer = nn.GroupNorm(1, channels, **extra)
    else:
        raise CifarlabError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")
    if not learn_scale:
        layer.weight.requires_grad_(False)
    return layer
