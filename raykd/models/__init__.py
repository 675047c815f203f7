"""Models: importing this package registers every model family in :data:`MODELS`."""

from raykd.models import resnet, small_cnn, wrn  # noqa: F401  (registration by import)
from raykd.models.base import MODELS, SSLModel, build_model

__all__ = ["MODELS", "SSLModel", "build_model"]
