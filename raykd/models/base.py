"""The model contract and the model registry.

Every model is an :class:`SSLModel`: a feature extractor followed by one linear ``classifier``.

* ``stages(x)`` returns the output of each stage (a list of feature maps, shallow → deep); the
  last entry is the final feature map after the last normalisation/activation, before pooling.
* ``feature_map(x)`` is ``stages(x)[-1]`` (SRD uses it).
* ``features(x)`` is the pooled feature vector ``h`` of width ``feature_dim``.
* ``forward(x)`` is ``classifier(features(x))``; ``forward(x, with_features=True)`` returns
  ``(logits, h)`` and ``forward(x, with_map=True)`` returns ``(logits, feature_map(x))``, so that a
  method can use both through one DDP-wrapped forward call.  ``pool(fmap)`` is the pooling between
  the feature map and the classifier (global average pooling).

A model family is a builder ``fn(num_classes: int, in_channels: int, image_size: int,
bn_momentum: float, **args) -> SSLModel`` registered with ``@MODELS.register(name)``.
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.registry import MODELS

__all__ = ["MODELS", "SSLModel", "build_model"]


class SSLModel(nn.Module):
    """Base class: subclasses set ``self.classifier`` and ``self.feature_dim`` and implement
    ``stages``."""

    classifier: nn.Linear
    feature_dim: int

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """The pooling between ``feature_map`` and ``classifier`` (global average pooling)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x))

    def forward(self, x: torch.Tensor, with_features: bool = False, with_map: bool = False):
        if with_map:  # (logits, last feature map) from one call, so a DDP-wrapped student can serve SRD
            fmap = self.feature_map(x)
            return self.classifier(self.pool(fmap)), fmap
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
