"""The model contract and the model registry.

Every model is an :class:`SSLModel`: a feature extractor followed by one linear ``classifier``.

* ``stages(x)`` returns the output of each stage (a list of feature maps, shallow → deep); the
  last entry is the final feature map after the last normalisation/activation, before pooling.
* ``feature_map(x)`` is ``stages(x)[-1]`` (SRD uses it).
* ``features(x)`` is the pooled feature vector ``h`` of width ``feature_dim``.
* ``forward(x)`` is ``classifier(features(x))``; ``forward(x, with_features=True)`` returns
  ``(logits, h)`` so that a method can use both through one DDP-wrapped forward call.

A model family is a builder ``fn(num_classes: int, in_channels: int, image_size: int,
bn_momentum: float, **args) -> SSLModel`` registered with ``@MODELS.register(name)``.
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.registry import Registry

MODELS: Registry = Registry("model", "model.name")


class SSLModel(nn.Module):
    """Base class: subclasses set ``self.classifier`` and ``self.feature_dim`` and implement
    ``stages``."""

    classifier: nn.Linear
    feature_dim: int

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.feature_map(x), 1), 1)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        h = self.features(x)
        logits = self.classifier(h)
        return (logits, h) if with_features else logits


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int, bn_momentum: float = 0.1, **args
) -> SSLModel:
    """Build a registered model by name."""
    return MODELS.get(name)(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        bn_momentum=bn_momentum,
        **args,
    )
