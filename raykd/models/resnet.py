"""ResNet-18 (He et al., CVPR 2016) from torchvision, adapted to small images.

The ImageNet stem (7×7 stride-2 conv + max-pool) is replaced by a 3×3 stride-1 conv without
pooling, as is usual for 32×32 inputs; ``stages`` are the outputs of ``layer1`` … ``layer4``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from raykd.models.base import MODELS, SSLModel


class ResNet18(SSLModel):
    """torchvision ResNet-18 with a small-input stem; ``classifier`` is its ``fc`` layer."""

    def __init__(self, num_classes: int, in_channels: int = 3, bn_momentum: float = 0.1):
        super().__init__()
        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(conv1, net.bn1, net.relu)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.classifier = net.fc
        self.feature_dim = net.fc.in_features
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int, bn_momentum: float = 0.1) -> SSLModel:
    """ResNet-18 with a 3×3 stride-1 stem and no max-pool; any input size ≥ 1 pixel works."""
    return ResNet18(num_classes, in_channels, bn_momentum)
