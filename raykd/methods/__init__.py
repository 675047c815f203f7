"""Training methods.  Importing this package registers every method module in it (discovery by
import: a new ``raykd/methods/<name>.py`` that registers itself needs no other edit)."""

from __future__ import annotations

import importlib
import pkgutil

from raykd.methods.base import METHODS, Batch, Method

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Batch", "Method"]
