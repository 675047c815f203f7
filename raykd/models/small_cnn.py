"""A small, fast CNN for tiny images (8×8 digits, 28×28 Fashion-MNIST, 32×32 CIFAR).

Three stages of ``convs`` × (conv3×3-BN-ReLU) with widths ``width``, 2·``width``, 4·``width``.
Stages 2 and 3 start with a 2×2 max-pool when the resolution at that point is at least 4, so an
8×8 input goes 8 → 4 → 2 and never below 2×2; then global average pooling and one linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.models.base import MODELS, SSLModel


def _conv_bn_relu(c_in: int, c_out: int, bn_momentum: float) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c_out, momentum=bn_momentum),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(SSLModel):
    """Three conv stages + global average pool + linear classifier."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        bn_momentum: float = 0.1,
        width: int = 32,
        convs: int = 1,
    ):
        super().__init__()
        if width < 1 or convs < 1:
            raise ValueError(f"small_cnn needs width >= 1 and convs >= 1, got {width}, {convs}")
        stages, c_in, size = [], in_channels, image_size
        for s in range(3):
            layers: list[nn.Module] = []
            if s > 0 and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_out = width * 2**s
            for _ in range(convs):
                layers += _conv_bn_relu(c_in, c_out, bn_momentum)
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(stages)
        self.feature_dim = c_in
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


@MODELS.register("small_cnn")
def small_cnn(
    num_classes: int,
    in_channels: int,
    image_size: int,
    bn_momentum: float = 0.1,
    *,
    width: int = 32,
    convs: int = 1,
) -> SSLModel:
    """Small CNN (widths ``width``·(1, 2, 4), ``convs`` conv-BN-ReLU per stage); ``image_size`` sets
    where it downsamples, but any input size runs."""
    return SmallCNN(num_classes, in_channels, image_size, bn_momentum, width, convs)
