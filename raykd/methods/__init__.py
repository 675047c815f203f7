"""Training methods: one module each, registered in :data:`raykd.registry.METHODS` (found by package
scan on the registry's first lookup: a new ``raykd/methods/<name>.py`` that registers itself needs no
other edit).  ``base`` holds the contract, ``common`` the helpers several methods share."""

from __future__ import annotations

from raykd.methods.base import METHODS, Batch, Method, MethodContext

__all__ = ["METHODS", "Batch", "Method", "MethodContext"]
