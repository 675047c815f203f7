"""A multi-exit wrapper for any :class:`~raykd.models.base.SSLModel` (TSKD, docs/methods.md).

An exit after stage ``s`` (not the last) is a bottleneck that brings that stage's feature map to
the last stage's resolution and width, global average pooling, and its own linear classifier.  The
bottleneck is a chain of conv3×3-BN-ReLU units: one stride-2 unit per halving needed to reach the
last stage's resolution (ceil halving, as strided convolutions do), widths doubling from the stage's
width and capped at the last stage's width; the last unit always outputs the last stage's width (a
stride-1 unit when the resolution already matches).  The deepest exit is the backbone itself: its
pooled features and its own ``classifier``.  Every exit's pooled, pre-classifier feature has the
backbone's ``feature_dim``, so the deep features can supervise the shallow ones directly.

The wrapper is itself an :class:`SSLModel`: ``stages``, ``features``, ``classifier`` and plain
``forward`` are the backbone's (the deepest exit), so anything that uses a plain model (a teacher
loaded from a TSKD run, SRD's ``feature_map``) keeps working.  ``forward(x, all_exits=True)`` returns
every exit at once — logits ``[K, N, C]`` and features ``[K, N, D]``, shallow → deep — through the
module's own ``forward``, so DDP's gradient synchronisation sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raykd.models.base import SSLModel


def _unit(c_in: int, c_out: int, stride: int, bn_momentum: float) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [conv, nn.BatchNorm2d(c_out, momentum=bn_momentum), nn.ReLU(inplace=True)]


def bottleneck(c_in: int, size: int, c_out: int, target: int, bn_momentum: float = 0.1) -> nn.Sequential:
    """conv3×3-BN-ReLU units from a ``c_in``×``size``² map to a ``c_out``×``target``² map."""
    strides = []
    while size > target:
        strides.append(2)
        size = (size + 1) // 2
    strides = strides or [1]
    layers: list[nn.Module] = []
    c = c_in
    for i, stride in enumerate(strides):
        nxt = c_out if i == len(strides) - 1 else min(c_out, c * 2)
        layers += _unit(c, nxt, stride, bn_momentum)
        c = nxt
    return nn.Sequential(*layers)


class MultiExit(SSLModel):
    """``backbone`` with exits after the 0-based stages ``exit_stages`` (the last stage is always one).

    Args:
        backbone: any SSLModel (its ``stages`` define where exits can go).
        exit_stages: 0-based stage indices (negative ones count from the end, ``[-2, -1]`` = the last
            two stages); the last stage is added if missing.
        image_shape: ``(C, H, W)`` of the inputs, used once to find each stage's shape.
        bn_momentum: BatchNorm momentum of the bottlenecks (use the backbone's).

    The shallow exits' classifiers have as many classes as the backbone's ``classifier``.
    """

    def __init__(
        self,
        backbone: SSLModel,
        exit_stages: Sequence[int],
        image_shape: tuple[int, int, int],
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        shapes = stage_shapes(backbone, image_shape)
        last = len(shapes) - 1
        if any(not -len(shapes) <= int(s) <= last for s in exit_stages):
            raise ValueError(f"exit stages must lie in -{len(shapes)}..{last} for this model, got {list(exit_stages)}")
        stages = sorted({int(s) % len(shapes) for s in exit_stages} | {last})
        self.exit_stages: tuple[int, ...] = tuple(stages)
        c_last, size_last = shapes[-1][0], shapes[-1][1]
        num_classes = backbone.classifier.out_features
        self.bottlenecks = nn.ModuleList(
            [bottleneck(shapes[s][0], shapes[s][1], c_last, size_last, bn_momentum) for s in self.exit_stages[:-1]]
        )
        self.heads = nn.ModuleList([nn.Linear(c_last, num_classes) for _ in self.exit_stages[:-1]])
        self.feature_dim = backbone.feature_dim

    @property
    def classifier(self) -> nn.Linear:  # the deepest exit's (not registered twice)
        return self.backbone.classifier

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.stages(x)

    def exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[K, N, C]`` and pooled pre-classifier features ``[K, N, D]`` of every exit, shallow → deep."""
        maps = self.backbone.stages(x)
        feats = [
            torch.flatten(nn.functional.adaptive_avg_pool2d(b(maps[s]), 1), 1)
            for s, b in zip(self.exit_stages[:-1], self.bottlenecks, strict=True)
        ]
        logits = [head(f) for head, f in zip(self.heads, feats, strict=True)]
        deep = self.backbone.pool(maps[-1])
        feats.append(deep)
        logits.append(self.backbone.classifier(deep))
        return torch.stack(logits), torch.stack(feats)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(fmap)

    def forward(self, x: torch.Tensor, with_features: bool = False, with_map: bool = False, all_exits: bool = False):
        """The deepest exit, as :meth:`SSLModel.forward`; with ``all_exits`` every exit (see :meth:`exits`)."""
        if all_exits:
            return self.exits(x)
        return super().forward(x, with_features=with_features, with_map=with_map)


@torch.no_grad()
def stage_shapes(model: SSLModel, image_shape: tuple[int, int, int]) -> list[tuple[int, int]]:
    """``(channels, height)`` of each stage output for one input of ``image_shape`` (BN statistics untouched)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        maps = model.stages(torch.zeros(1, *image_shape, device=device))
    finally:
        model.train(was_training)
    return [(int(m.shape[1]), int(m.shape[2])) for m in maps]


def num_stages(model_name: str, model_args: dict | None = None) -> int:
    """How many stages a registered model has (built on the meta device: no memory, no weights)."""
    from raykd.models.base import build_model

    with torch.device("meta"):
        model = build_model(model_name, num_classes=2, in_channels=3, image_size=32, **(model_args or {}))
        return len(model.stages(torch.empty(1, 3, 32, 32)))
