"""The three registries — datasets, models, methods — and how their entries are found.

Each registry belongs to one plugin package (``raykd.data``, ``raykd.models``, ``raykd.methods``).
Entries register themselves with a decorator (``@METHODS.register("fixmatch")``) in their own
module; the registry finds them by **package scan**: the first lookup (``get``, ``names``, ``in``)
imports every module of the package, so adding ``raykd/methods/<name>.py`` needs no other edit and no
hand-kept list.  Modules whose name starts with ``_`` are helpers and are not scanned.

This module sits at the bottom of the house (it imports only :mod:`raykd.errors`): ``raykd.config``
validates names through it without importing a plugin package itself.  Looking up an unknown name
raises :class:`raykd.errors.ConfigError` naming the config field and the allowed values.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from raykd.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object table filled by the modules of one package.

    Args:
        kind: what is registered (``"method"``, ``"model"``, ``"dataset"``), used in messages.
        field: the config field that selects an entry (``"method.name"``), used in errors.
        package: the package whose modules register entries (scanned on the first lookup).
    """

    def __init__(self, kind: str, field: str, package: str):
        self.kind = kind
        self.field = field
        self.package = package
        self._items: dict[str, T] = {}
        self._scanned = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is a programming error."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return deco

    def scan(self) -> None:
        """Import every public module of the package (once); each registers its entries."""
        if self._scanned:
            return
        self._scanned = True  # set first: a module that looks an entry up while being imported must not recurse
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")

    def get(self, name: str) -> T:
        self.scan()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                self.field, f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self.scan()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self.scan()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.scan()
        return len(self._items)


#: dataset families: ``load(root) -> DatasetBundle`` (raykd/data/<family>.py)
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "data.name", "raykd.data")
#: model builders: ``fn(num_classes, in_channels, image_size, bn_momentum, **args) -> SSLModel``
MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name", "raykd.models")
#: training methods: :class:`raykd.methods.base.Method` subclasses (raykd/methods/<name>.py)
METHODS: Registry[Any] = Registry("method", "method.name", "raykd.methods")
