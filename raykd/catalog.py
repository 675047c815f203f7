"""What ``raykd methods`` prints: the registered methods, their knobs and what they need.

``raykd methods`` lists every method in a few lines each: its summary, what it needs (a teacher,
unlabeled data, a validation split), its knobs as a YAML ``method:`` mapping with the defaults, and
the knobs a study can search with ``default``; then the train knobs every study can search that way.
``raykd methods NAME`` describes one method in full: every knob with its type, default, allowed
range, declared search space and help, and the searchable train knobs with theirs.

Everything is read from the registry and the methods' ``Config`` classes (the knobs declared with
:func:`raykd.config.knob`), values are written as a user types them in YAML (``true``, ``null``,
``[0.7, 0.99]``), and no line is wider than :data:`WIDTH` columns.
"""

from __future__ import annotations

import textwrap
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raykd.config import DataConfig, MethodConfig, ModelConfig, RunConfig, ScalingConfig, TrainConfig, search_range
from raykd.errors import ConfigError
from raykd.registry import METHODS

#: the widest line raykd methods prints
WIDTH = 100


def yaml_value(value: Any) -> str:
    """``value`` as it is written in a YAML config: ``true``, ``null``, ``0.0005``, ``[1, 2]``,
    ``{uniform: [0.7, 0.99]}``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _wrap(text: str, indent: str = "", first: str | None = None, width: int = WIDTH) -> list[str]:
    first = indent if first is None else first
    return textwrap.wrap(" ".join(text.split()), width=width, initial_indent=first, subsequent_indent=indent,
                         break_on_hyphens=False) or [first.rstrip()]  # fmt: skip


def summary(method: Any) -> str:
    """The method's description: its class docstring, on one line."""
    return " ".join((method.__doc__ or "").split())


def knobs(config: type[BaseModel]) -> dict[str, FieldInfo]:
    """The user-set fields of a method's ``Config`` (everything but ``name``)."""
    return {k: f for k, f in config.model_fields.items() if k != "name"}


def searchable(config: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """``{knob: declared search range}`` of the knobs a study can search with ``default``."""
    out = {}
    for k in knobs(config):
        rng = search_range(config, k)
        if rng is not None:
            out[k] = rng
    return out


def needs_validation(name: str) -> bool:
    """Whether the method refuses a run without a validation split (its ``check_run`` names
    ``data.val_per_class`` when there is none)."""
    config = METHODS.get(name).Config
    run = RunConfig.model_construct(data=DataConfig(val_per_class=0), model=ModelConfig(), method=config(name=name),
                                    train=TrainConfig(), scaling=ScalingConfig(), teacher=None,
                                    provenance=None)  # fmt: skip
    try:
        config.check_run(run)
    except ConfigError as e:
        return e.field == "data.val_per_class"
    except Exception:  # noqa: BLE001 - a rule that needs more of the run than this probe has: not this one
        return False
    return False


def needs(name: str) -> list[str]:
    """``["teacher: required ...", "unlabeled data: used ...", "validation split: optional"]``."""
    config: type[MethodConfig] = METHODS.get(name).Config
    teacher = "required (teacher.checkpoint or teacher.run)" if config.needs_teacher else "none"
    unlabeled = "used (train.uratio x batch)" if config.uses_unlabeled else "not used"
    val = "required (data.val_per_class >= 1)" if needs_validation(name) else "optional"
    return [f"teacher: {teacher}", f"unlabeled data: {unlabeled}", f"validation split: {val}"]


def type_name(annotation: Any) -> str:
    """A field's type in words: ``float``, ``int or null``, ``choice``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return "choice"
    if args and type(None) in args:
        rest = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(rest) + " or null"
    if args:
        return " or ".join(type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def value_range(field: FieldInfo) -> str:
    """The values a field accepts: ``in [0, 1]``, ``> 0``, ``one of: ce, sce``; empty when any."""
    choices = _literal_values(field.annotation)
    if choices:
        return "one of: " + ", ".join(yaml_value(c) for c in choices)
    bounds = {}
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(m, attr, None) is not None:
                bounds[attr] = getattr(m, attr)
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{yaml_value(lo[1])}, {yaml_value(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {yaml_value(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {yaml_value(hi[1])}"
    return ""


def _literal_values(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        found = _literal_values(arg)
        if found:
            return found
    return []


def knob_lines(config: type[BaseModel], prefix: str, names: list[str] | None = None) -> list[str]:
    """Each knob (or those in ``names``) in two wrapped lines: ``train.lr: float = 0.03, > 0; search
    {loguniform: [0.005, 0.1]}``, then its help, indented."""
    lines = []
    for k in names if names is not None else list(knobs(config)):
        f = config.model_fields[k]
        rng, allowed = search_range(config, k), value_range(f)
        head = f"{prefix}{k}: {type_name(f.annotation)} = {yaml_value(f.get_default(call_default_factory=True))}"
        head += f", {allowed}" if allowed else ""
        head += f"; search {yaml_value(rng)}" if rng else "; not searchable by default"
        lines += _wrap(head, "      ", "  ")
        if f.description:
            lines += _wrap(f.description, "      ")
    return lines


def _train_knobs(uses_unlabeled: bool = True) -> list[str]:
    """The searchable train knobs (``train.uratio`` only for methods that use unlabeled data)."""
    return [k for k in searchable(TrainConfig) if uses_unlabeled or k != "uratio"]


def listing() -> str:
    """``raykd methods``: every method in a few lines, then the searchable train knobs."""
    names = METHODS.names()
    lines = _wrap(f"{len(names)} methods (method.name). `raykd methods NAME` shows one in full: every knob's "
                  "type, range and help. In a study, `search: {method.KNOB: default}` or `{train.KNOB: default}` "
                  "searches a knob over its declared range.")  # fmt: skip
    for name in names:
        method = METHODS.get(name)
        lines.append("")
        lines += _wrap(summary(method), "    ", f"{name}: ")
        lines += _wrap(" | ".join(needs(name)), "    ", "  ")
        defaults = {k: f.get_default(call_default_factory=True) for k, f in knobs(method.Config).items()}
        mapping = {"name": name, **defaults}
        lines += _wrap(f"method: {yaml_value(mapping)}", "    ", "  ")
        space = searchable(method.Config)
        found = ", ".join(f"method.{k} {yaml_value(r)}" for k, r in space.items()) or "none"
        lines += _wrap(f"search defaults: {found}", "    ", "  ")
    lines += ["", "train knobs every study can search with `default`:"]
    lines += knob_lines(TrainConfig, "train.", _train_knobs())
    return "\n".join(lines)


def describe(name: str) -> str:
    """``raykd methods NAME``: one method in full.  An unknown name is a :class:`ConfigError` (exit 2)
    naming the registered methods."""
    if name not in METHODS:
        raise ConfigError(name, f"no such method; choose one of: {', '.join(METHODS.names())}")
    method = METHODS.get(name)
    lines = _wrap(summary(method), "", f"{name}: ")
    lines += ["", *needs(name)]
    lines += _wrap(f"Formulas and the design decisions the papers left open: the docstring of raykd/methods/"
                   f"{method.__module__.rsplit('.', 1)[-1]}.py.")  # fmt: skip
    lines += ["", f"knobs (the run config's method section, {{name: {name}, ...}}):"]
    lines += knob_lines(method.Config, "method.") or ["  (none)"]
    train = _train_knobs(method.Config.uses_unlabeled)
    lines += ["", "train knobs a study can search with `default`:", *knob_lines(TrainConfig, "train.", train)]
    keys = [f"method.{k}" for k in searchable(method.Config)][:2] + ["train.lr"]
    example = "{" + ", ".join(f"{k}: default" for k in keys) + "}"
    lines += ["", *_wrap(f"e.g. in a study file: search: {example}")]
    return "\n".join(lines)
