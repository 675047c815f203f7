"""The three registries — datasets, models, methods — and how their entries are found.

Each registry belongs to one plugin package (``raykd.data``, ``raykd.models``, ``raykd.methods``).
Entries register themselves with a decorator (``@METHODS.register("fixmatch")``) in their own
module.  The registry finds them by **reading the package's source**: the first lookup parses every
module of the package (``ast``, no import) for ``@<REGISTRY>.register("<name>")`` decorators, so
adding ``raykd/methods/<name>.py`` needs no other edit and no hand-kept list.  A module is imported
only when one of its entries is used (``get``), so validating a config imports the one method it
names and never torch's model or data code: a typo is refused in well under a second.  Modules whose
name starts with ``_`` are helpers and are not read.

This module sits at the bottom of the house (it imports only :mod:`raykd.errors`): ``raykd.config``
validates names through it without importing a plugin package itself.  Looking up an unknown name
raises :class:`raykd.errors.ConfigError` naming the config field and the allowed values.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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

    def __init__(self, kind: str, field: str, package: str, symbol: str):
        self.kind = kind
        self.field = field
        self.package = package
        self.symbol = symbol
        self._items: dict[str, T] = {}
        self._index: dict[str, _Entry] | None = None

    def register(self, name: str, **facts: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a duplicate name is a programming error.

        ``facts`` are literal keywords (e.g. ``reads_root=False``) that config validation reads from
        the source, without importing the module (:meth:`facts`)."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return deco

    def index(self) -> dict[str, _Entry]:
        """``name -> where it is registered``, read from the package's source files (no import)."""
        if self._index is None:
            spec = importlib.util.find_spec(self.package)
            folders = list(spec.submodule_search_locations or []) if spec else []
            index: dict[str, _Entry] = {}
            for folder in folders:
                for path in sorted(Path(folder).glob("*.py")):
                    if not path.name.startswith("_"):
                        for entry in _registrations(path, f"{self.package}.{path.stem}", self.symbol):
                            index.setdefault(entry.name, entry)
            self._index = index
        return self._index

    def scan(self) -> None:
        """Import every module that registers an entry (``raykd methods`` lists all their configs)."""
        for name in self.index():
            self.get(name)

    def get(self, name: str) -> T:
        if name not in self._items and name in self.index():
            importlib.import_module(self.index()[name].module)
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                self.field, f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def parameters(self, name: str) -> list[Parameter]:
        """The parameters of a registered *function*, read from its source without importing it
        (annotations as written, defaults as literals): what ``model.*`` arguments are checked against."""
        if name not in self.index():
            self.get(name)  # raises the unknown-name error
        return list(self.index()[name].parameters)

    def facts(self, name: str) -> dict[str, Any]:
        """The literal keywords given to ``register`` for ``name`` (read from the source)."""
        if name not in self.index():
            self.get(name)
        return dict(self.index()[name].facts)

    def names(self) -> list[str]:
        return sorted({*self.index(), *self._items})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.index()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


#: the default of a parameter that has none (or whose default is not a literal)
REQUIRED: Any = object()


@dataclass(frozen=True)
class Parameter:
    """One parameter of a registered function as written in its source."""

    name: str
    annotation: str | None  # the annotation's source text
    default: Any  # a literal default, or REQUIRED
    variadic: bool = False  # *args or **kwargs


@dataclass(frozen=True)
class _Entry:
    name: str
    module: str
    parameters: tuple[Parameter, ...] = ()
    facts: tuple[tuple[str, Any], ...] = ()


def _registrations(path: Path, module: str, symbol: str) -> list[_Entry]:
    """Every ``@<symbol>.register("<name>")`` decorator of a module's top-level defs and classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if (
                isinstance(deco, ast.Call)
                and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "register"
                and isinstance(deco.func.value, ast.Name)
                and deco.func.value.id == symbol
                and deco.args
                and isinstance(deco.args[0], ast.Constant)
                and isinstance(deco.args[0].value, str)
            ):
                params = _parameters(node.args) if not isinstance(node, ast.ClassDef) else ()
                facts = tuple((k.arg, ast.literal_eval(k.value)) for k in deco.keywords if k.arg is not None)
                found.append(_Entry(deco.args[0].value, module, params, facts))
    return found


def _parameters(args: ast.arguments) -> tuple[Parameter, ...]:
    def literal(node: ast.expr | None) -> Any:
        if node is None:
            return REQUIRED
        try:
            return ast.literal_eval(node)
        except ValueError:
            return REQUIRED  # a computed default: treated as required by the light check

    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [
        Parameter(a.arg, ast.unparse(a.annotation) if a.annotation else None, literal(d))
        for a, d in zip(positional, defaults, strict=True)
    ]
    out += [
        Parameter(a.arg, ast.unparse(a.annotation) if a.annotation else None, literal(d))
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    out += [Parameter(v.arg, None, REQUIRED, variadic=True) for v in (args.vararg, args.kwarg) if v is not None]
    return tuple(out)


#: dataset families: ``load(root) -> DatasetBundle`` (raykd/data/<family>.py)
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "data.name", "raykd.data", "DATASETS")
#: model builders: ``fn(num_classes, in_channels, image_size, bn_momentum, **args) -> SSLModel``
MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name", "raykd.models", "MODELS")
#: training methods: :class:`raykd.methods.base.Method` subclasses (raykd/methods/<name>.py)
METHODS: Registry[Any] = Registry("method", "method.name", "raykd.methods", "METHODS")
