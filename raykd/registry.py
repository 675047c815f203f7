"""One generic registry: datasets, models and methods register by decorator.

Discovery is by import: each package's ``__init__`` imports its modules, so no second list of
names has to be kept in sync.  Looking up an unknown name raises :class:`raykd.errors.ConfigError`
naming the config field and the allowed values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from raykd.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object table.

    Args:
        kind: what is registered (``"method"``, ``"model"``, ``"dataset"``), used in messages.
        field: the config field that selects an entry (``"method.name"``), used in errors.
    """

    def __init__(self, kind: str, field: str):
        self.kind = kind
        self.field = field
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is a programming error."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                self.field, f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
