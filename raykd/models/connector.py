"""SRD's connector φ: the student's last feature map → the teacher's channels (an adapter module
trained with the student; not a registered model)."""

from __future__ import annotations

import torch
from torch import nn

#: the connector kinds (the choices of ``srd``'s ``method.connector``; a test holds the two equal)
KINDS = ("conv1x1_bn_relu", "conv1x1", "linear_on_pooled")


class Connector(nn.Module):
    """φ: the student's last feature map ``[B, C_s, H, W]`` → the teacher's channels.

    ``conv1x1_bn_relu`` and ``conv1x1`` keep the spatial map (``[B, C_t, H, W]``); ``linear_on_pooled``
    pools first and returns ``[B, C_t, 1, 1]`` so that the teacher's pooling is the identity on it.
    """

    def __init__(self, c_student: int, c_teacher: int, kind: str = "conv1x1_bn_relu"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown connector {kind!r}")
        self.kind = kind
        if kind == "linear_on_pooled":
            self.proj = nn.Linear(c_student, c_teacher)
            self.post = nn.Identity()
        else:
            self.proj = nn.Conv2d(c_student, c_teacher, kernel_size=1, bias=False)
            self.post = (
                nn.Sequential(nn.BatchNorm2d(c_teacher), nn.ReLU(inplace=True))
                if kind == "conv1x1_bn_relu"
                else nn.Identity()
            )
            nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear_on_pooled":
            return self.proj(fmap.float().mean(dim=(2, 3)))[:, :, None, None]
        return self.post(self.proj(fmap))
