"""CIFAR ResNet18/34 (He et al., 2016, with the 32x32 stem popularised by kuangliu/pytorch-cifar).

Unlike the ImageNet ResNet the stem is one stride-1 3x3 conv and there is no max-pool, so
the four stages see 32, 16, 8 and 4 pixel maps. With BatchNorm and 10 classes ResNet18
has 11,173,962 parameters and ResNet34 21,282,122 -- the numbers CIFAR papers quote.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.models.norm import make_norm

WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        # Separate, non-inplace activations: every hook point (the CAM methods) then sees
        # exactly one call per forward and an output no later op overwrites.
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            # Named so every norm parameter's name contains "norm" (param-group filters).
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    norm=make_norm(norm, out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to a (B, C, H, W) map."""
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet built from :class:`BasicBlock` stages.

    ``features`` is ``stem, layer1..layer4`` (32, 32, 16, 8, 4 pixels on a 32x32 input);
    ``head`` is average pool, flatten, dropout, linear. ``cam_layer`` is
    ``"features.layer3"``, the last stage with an 8x8 map (layer4 is only 4x4).
    """

    cam_layer = "features.layer3"

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        num_classes: int = 10,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["stem"] = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, WIDTHS[0], 3, 1, padding=1, bias=False),
                norm=make_norm(norm, WIDTHS[0]),
                act=nn.ReLU(),
            )
        )
        in_channels = WIDTHS[0]
        for i, (n_blocks, width, stride) in enumerate(zip(blocks, WIDTHS, STRIDES), start=1):
            layers = []
            for j in range(n_blocks):
                layers.append(BasicBlock(in_channels, width, stride if j == 0 else 1, norm))
                in_channels = width
            stages[f"layer{i}"] = nn.Sequential(*layers)
        self.features = nn.Sequential(stages)
        self.head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(in_channels, num_classes),
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. (2015) init for ReLU nets, as torchvision's ResNet uses.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) images to (B, num_classes) logits."""
        return self.head(self.features(x))


def resnet18(*, num_classes: int = 10, norm: str = "batch", dropout: float = 0.0) -> ResNet:
    """CIFAR ResNet18: BasicBlocks [2, 2, 2, 2]."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, norm=norm, dropout=dropout)


def resnet34(*, num_classes: int = 10, norm: str = "batch", dropout: float = 0.0) -> ResNet:
    """CIFAR ResNet34: BasicBlocks [3, 4, 6, 3]."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, norm=norm, dropout=dropout)
