"""Modules imported on first use, so that code which only *validates* a config never imports torch.

``raykd.methods`` modules hold both a method's config (read by ``raykd train`` and ``study run`` to
validate input before anything starts) and its training code (torch).  They import torch through
this module::

    from raykd.lazy import F, nn, torch

Each name is a stand-in whose first attribute lookup imports the real module; after that a lookup
costs one dictionary access.  Class bases and other module-level uses of torch must stay inside
functions (or in :mod:`raykd.models`, which the config layer never imports).
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__all__ = ["F", "LazyModule", "nn", "no_grad", "np", "torch"]


class LazyModule(types.ModuleType):
    """A module imported on its first attribute lookup (then every lookup goes to the real module)."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)  # introspection (copy, pickle, doctest) must not import torch
        return getattr(importlib.import_module(self.__name__), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


if TYPE_CHECKING:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
else:
    torch = LazyModule("torch")
    nn = LazyModule("torch.nn")
    F = LazyModule("torch.nn.functional")
    np = LazyModule("numpy")


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``@torch.no_grad()`` without importing torch when the function is defined."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
