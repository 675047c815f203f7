"""Models: each family is one module that registers itself in :data:`raykd.registry.MODELS` (found by
package scan on the registry's first lookup)."""

from raykd.models.base import MODELS, SSLModel, build_model

__all__ = ["MODELS", "SSLModel", "build_model"]
