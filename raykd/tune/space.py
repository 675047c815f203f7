"""The search-space DSL: dotted run-config keys → distributions, validated before Ray starts.

A study's ``search`` maps keys such as ``method.threshold`` or ``train.lr`` to one of::

    {uniform: [lo, hi]}   {loguniform: [lo, hi]}   {int: [lo, hi]}   {logint: [lo, hi]}   {choice: [a, b, ...]}

or to ``default``, the range the method (or the train section) declares beside the knob's default.
:func:`resolve_search` checks every key exists in the base run config, every range is non-empty and
ordered, log ranges are positive, and that the base config stays valid at every bound and choice
(so a threshold range of [0.5, 1.5] is refused up front, not in trial 7).  :func:`suggest` turns the
resolved space into Optuna ``suggest_*`` calls (a define-by-run space for ``OptunaSearch``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from raykd.config import DISTRIBUTIONS, RunConfig, TrainConfig, parse_run_config, search_range, set_dotted
from raykd.errors import ConfigError
from raykd.registry import MODELS
from raykd.train.cost import COST_METRICS
from raykd.train.loop import LOOP_METRICS, VAL_METRICS

if TYPE_CHECKING:
    from raykd.tune.config import StudyConfig

SECTIONS = ("data", "model", "method", "train", "scaling")
NOT_SEARCHABLE = {"method.name": "each method has its own knobs: run one study per method"}


@dataclass(frozen=True)
class Dist:
    """One resolved search dimension."""

    key: str
    kind: str  # uniform | loguniform | int | logint | choice
    args: tuple

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"


def declared_range(base: RunConfig, key: str) -> dict[str, Any] | None:
    """The search range declared for ``key`` by the method or the train section, if any."""
    section, _, name = key.partition(".")
    owner = {"method": type(base.method), "train": TrainConfig}.get(section)
    if owner is None or name not in owner.model_fields:
        return None
    return search_range(owner, name)


LOG_KINDS = ("loguniform", "logint")


def log_scaled(space: dict[str, Dist]) -> set[str]:
    """The keys of a resolved space sampled on a log scale (their plots get a log x axis)."""
    return {key for key, d in space.items() if d.kind in LOG_KINDS}


def declared_log_scaled(base: RunConfig, keys: list[str]) -> set[str]:
    """The ``keys`` whose declared search range (:func:`declared_range`) is on a log scale."""
    return {key for key in keys if next(iter(declared_range(base, key) or {"": None})) in LOG_KINDS}


def check_key(base: RunConfig, key: str, field: str) -> None:
    """``key`` must name a knob of ``base``: ``section.knob``, or a deeper field of a nested section
    the base config sets (``data.open_set.unseen_fraction``); errors are reported on ``field``."""
    parts = key.split(".")
    if parts[0] not in SECTIONS or len(parts) < 2:
        raise ConfigError(field, f"not a run-config knob; use section.knob with a section in {', '.join(SECTIONS)}")
    if key in NOT_SEARCHABLE:
        raise ConfigError(field, NOT_SEARCHABLE[key])
    section = getattr(base, parts[0])
    if len(parts) > 2:
        _check_nested(section, parts, field)
        return
    if parts[0] == "model":  # model arguments come from the builder's signature
        allowed = ["bn_momentum", *inspect.signature(MODELS.get(base.model.name)).parameters]
        allowed = [a for a in allowed if a not in ("num_classes", "in_channels", "image_size", "kwargs")]
    else:
        allowed = [k for k in type(section).model_fields if k != "name" or parts[0] != "method"]
    if parts[1] not in allowed:
        raise ConfigError(field, f"{base.method.name if parts[0] == 'method' else parts[0]} has no knob "
                          f"{parts[1]!r}; knobs: {', '.join(allowed)}")  # fmt: skip


def _check_nested(node: Any, parts: list[str], field: str) -> None:
    """Walk ``parts[1:]`` through the nested config models under the section ``node``."""
    for i, part in enumerate(parts[1:], start=1):
        here = ".".join(parts[:i])
        if node is None:
            raise ConfigError(field, f"{here} is not set in the base config; set it there to search {'.'.join(parts)}")
        if not isinstance(node, BaseModel):
            raise ConfigError(field, f"{here} is a value, not a section")
        fields = type(node).model_fields
        if part not in fields:
            raise ConfigError(field, f"{here} has no field {part!r}; fields: {', '.join(fields)}")
        node = getattr(node, part)


def _parse_dist(key: str, spec: Any, base: RunConfig) -> Dist:
    field = f"search.{key}"
    if spec == "default":
        spec = declared_range(base, key)
        if spec is None:
            raise ConfigError(field, "has no declared search range; give one, e.g. {uniform: [lo, hi]}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(field, f"expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{uniform: [0.7, 0.99]}}) or "
                          "default")  # fmt: skip
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(field, f"unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(field, f"{kind} needs a non-empty list")
    if kind == "choice":
        if len(args) < 2:
            raise ConfigError(field, "choice needs at least two values")
        return Dist(key, kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(field, f"{kind} needs [low, high] numbers, got {args!r}")
    lo, hi = args
    if kind in ("int", "logint") and not all(float(a).is_integer() for a in args):
        raise ConfigError(field, f"{kind} needs integer bounds, got {args!r}")
    if lo >= hi:
        raise ConfigError(field, f"empty or inverted range [{lo}, {hi}]; low must be below high")
    if kind.startswith("log") and lo <= 0:
        raise ConfigError(field, f"{kind} needs a positive low bound, got {lo}")
    if kind in ("int", "logint"):
        return Dist(key, kind, (int(lo), int(hi)))
    return Dist(key, kind, (float(lo), float(hi)))


def with_params(base: RunConfig | dict[str, Any], params: dict[str, Any]) -> RunConfig:
    """The base run config with dotted ``params`` substituted (validated)."""
    raw = base.model_dump(mode="json") if isinstance(base, RunConfig) else base
    return parse_run_config(set_dotted(raw, params))


def resolve_search(study: StudyConfig) -> dict[str, Dist]:
    """Validate ``study.search`` against ``study.base`` and return the resolved dimensions."""
    space: dict[str, Dist] = {}
    for key, spec in study.search.items():
        check_key(study.base, key, field=f"search.{key}")
        dist = _parse_dist(key, spec, study.base)
        for v in dist.args:  # both bounds, or every choice
            try:
                with_params(study.base, {key: v})
            except ConfigError as e:
                raise ConfigError(f"search.{key}", f"value {v!r} is invalid for {e.field}: {e.message}") from None
        space[key] = dist
    return space


def reported_metrics(base: RunConfig) -> set[str]:
    """Every metric a run of ``base`` reports at each evaluation."""
    facts = type(base.method)  # the method's static facts (its Config)
    metrics = set(LOOP_METRICS) | set(COST_METRICS) | set(facts.logs(base)) | set(facts.eval_metrics(base))
    if base.data.val_per_class > 0:
        metrics |= set(VAL_METRICS)
    return metrics


def check_metric(base: RunConfig, metric: str, field: str = "tune.metric") -> None:
    known = reported_metrics(base)
    if metric in VAL_METRICS and metric not in known:
        raise ConfigError(field, f"{metric} needs a validation split: set base.data.val_per_class > 0, or use test_acc")
    if metric not in known:
        raise ConfigError(field, f"{base.method.name} runs never report {metric!r}; choose one of: "
                          f"{', '.join(sorted(known))}")  # fmt: skip


def suggest(trial: Any, space: dict[str, Dist]) -> None:
    """Define-by-run Optuna space: one ``suggest_*`` call per dimension (param name = dotted key)."""
    for key, d in space.items():
        if d.kind == "uniform":
            trial.suggest_float(key, *d.args)
        elif d.kind == "loguniform":
            trial.suggest_float(key, *d.args, log=True)
        elif d.kind == "int":
            trial.suggest_int(key, *d.args)
        elif d.kind == "logint":
            trial.suggest_int(key, *d.args, log=True)
        else:
            trial.suggest_categorical(key, list(d.args))


def short_names(keys: list[str]) -> dict[str, str]:
    """Column names for the progress table: the last component, or more where that is ambiguous."""
    names = {}
    for key in keys:
        last = key.split(".")[-1]
        clash = sum(k.split(".")[-1] == last for k in keys) > 1
        names[key] = key if clash else last
    return names
