"""Wide-ResNet-28-k in the form used by the semi-supervised literature.

Architecture: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016); SSL variant as in
Sohn et al., "FixMatch" (NeurIPS 2020) and USB: pre-activation basic blocks, LeakyReLU(0.1),
widths 16, 16k, 32k, 64k with strides 1, 2, 2, a final BN + LeakyReLU, global average pooling and
one linear classifier.

``bn_momentum`` uses PyTorch semantics (weight of the *new* batch statistic), so the literature's
TF decay 0.999 is ``bn_momentum=0.001``.  The residual unit follows the original FixMatch
(TensorFlow) definition: ``conv1`` always sees the pre-activated input; the shortcut sees the
pre-activated input only in the first block (``activate_before_residual``), the raw input otherwise.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raykd.models.base import MODELS, SSLModel

_SLOPE = 0.1


class _Block(nn.Module):
    """Pre-activation basic block: BN-act-conv3×3-BN-act-(dropout)-conv3×3 plus a shortcut."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        bn_momentum: float,
        drop_rate: float,
        activate_before_residual: bool,
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(_SLOPE)
        self.drop_rate = drop_rate
        self.activate_before_residual = activate_before_residual
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if (c_in != c_out or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act(self.bn1(x))
        if self.activate_before_residual:
            x = o
        o = self.act(self.bn2(self.conv1(o)))
        if self.drop_rate > 0:
            o = F.dropout(o, p=self.drop_rate, training=self.training)
        o = self.conv2(o)
        return o + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(SSLModel):
    """WRN-``depth``-``widen`` (depth = 6n + 4). ``stages`` are the three group outputs; the last
    one is taken after the final BN + LeakyReLU."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 28,
        widen: int = 2,
        bn_momentum: float = 0.1,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                _Block(
                    widths[g] if i == 0 else widths[g + 1],
                    widths[g + 1],
                    stride if i == 0 else 1,
                    bn_momentum,
                    drop_rate,
                    activate_before_residual=(g == 0 and i == 0),
                )
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.act = nn.LeakyReLU(_SLOPE)
        self.feature_dim = widths[3]
        self.classifier = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = self.stem(x)
        for i, group in enumerate(self.groups):
            x = group(x)
            if i == len(self.groups) - 1:
                x = self.act(self.bn(x))
            out.append(x)
        return out


@MODELS.register("wrn_28_2")
def wrn_28_2(
    num_classes: int, in_channels: int, image_size: int, bn_momentum: float = 0.1, *, drop_rate: float = 0.0
) -> SSLModel:
    """WRN-28-2 (Zagoruyko & Komodakis 2016; SSL variant of Sohn et al. 2020); any input size."""
    return WideResNet(num_classes, in_channels, 28, 2, bn_momentum, drop_rate)


@MODELS.register("wrn_28_8")
def wrn_28_8(
    num_classes: int, in_channels: int, image_size: int, bn_momentum: float = 0.1, *, drop_rate: float = 0.0
) -> SSLModel:
    """WRN-28-8 (Zagoruyko & Komodakis 2016; SSL variant of Sohn et al. 2020); any input size."""
    return WideResNet(num_classes, in_channels, 28, 8, bn_momentum, drop_rate)
