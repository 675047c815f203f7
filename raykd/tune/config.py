"""Typed study and ablation files (pydantic v2, unknown keys rejected), above the run config.

A study file is ``name``, ``base`` (a run config), ``search`` and ``tune``; an ablation file is
``name``, ``base``, ``grid``, ``seeds`` and ``metric``.  docs/studies.md describes every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raykd.config import RunConfig, Strict, expect_kind, parse_config, read_yaml
from raykd.errors import ConfigError
from raykd.tune.storage import check_storage

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Objective(Strict):
    """One objective of a multi-objective study (``tune.objectives``)."""

    metric: str
    mode: Literal["max", "min"] = "max"


class TuneSettings(Strict):
    """How a study searches (the ``tune`` section)."""

    num_samples: int = Field(8, ge=1, description="trials in the study")
    metric: str = Field("val_acc", description="metric to optimise (val_acc needs base.data.val_per_class > 0)")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = Field("asha", description="early stopping over evaluation rounds")
    grace_period: int = Field(1, ge=1, description="ASHA: evaluation rounds before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor at each rung")
    max_concurrent: int | None = Field(None, ge=1, description="cap on concurrent trials (default: what fits)")
    seed: int = Field(0, description="seed of the Optuna TPE sampler")
    max_failures: int = Field(
        3, ge=0, description="restarts of a failed trial from its last checkpoint (a lost or preempted node)"
    )
    storage: str | None = Field(None, description="parent folder (or URI) of the study folder; default runs/")
    budget_hours: float | None = Field(
        None, gt=0, description="device-hours after which no new trial starts (running ones finish); null = none"
    )
    objectives: list[Objective] | None = Field(
        None, min_length=2, description="several metrics at once (Optuna's multi-objective TPE, a Pareto set); "
        "the first one is also tune.metric / tune.mode"
    )
    repeats: int = Field(
        1, ge=1, le=64, description="seeds per configuration: each trial trains its configuration k times (seed "
        "i sets train.seed and data.seed to base.train.seed + i) and reports their aggregate"
    )
    aggregate: Literal["mean", "mean_minus_std", "lower_ci"] = Field(
        "mean", description="with repeats: what the searcher and early stopping see of the seeds' values (mean; "
        "mean one std towards worse; the worse end of the 95 % t-interval)"
    )

    @model_validator(mode="before")
    @classmethod
    def _first_objective_is_the_metric(cls, data: Any) -> Any:
        objectives = data.get("objectives") if isinstance(data, dict) else None
        if isinstance(objectives, list) and objectives and isinstance(objectives[0], dict):
            data = {**data, "metric": objectives[0].get("metric"), "mode": objectives[0].get("mode", "max")}
        return data

    @model_validator(mode="after")
    def _repeats(self) -> TuneSettings:
        if self.aggregate != "mean" and self.repeats < 2:
            raise ConfigError("tune.aggregate", f"{self.aggregate} needs a spread over seeds: set tune.repeats to 2 "
                              "or more, or use aggregate: mean")  # fmt: skip
        if self.repeats > 1 and self.objectives:
            raise ConfigError("tune.repeats", "seed repeats are not supported with tune.objectives yet; drop one "
                              "of the two (a Pareto study trains each configuration once)")  # fmt: skip
        return self

    @property
    def selection(self) -> str:
        """The metric trials are ranked on: ``metric``, or with repeats and a spread-aware aggregate
        ``<metric>_<aggregate>`` (e.g. ``val_acc_mean_minus_std``); a repeated trial's ``metric`` is
        its mean over seeds."""
        return self.metric if self.repeats == 1 or self.aggregate == "mean" else f"{self.metric}_{self.aggregate}"

    @property
    def metrics(self) -> list[str]:
        """The objectives' metrics (``[metric]`` for a single-objective study)."""
        return [o.metric for o in self.objectives] if self.objectives else [self.metric]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives] if self.objectives else [self.mode]

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        return check_storage(v, "tune.storage")


class StudyConfig(Strict):
    """A hyperparameter study: a base run config, the knobs to search and how to search them.

    ``search`` maps dotted run-config keys to a distribution (``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}``, ``{int: [lo, hi]}``, ``{logint: [lo, hi]}``, ``{choice: [...]}``) or to
    ``default`` (the range the method or train section declares for that knob).
    """

    name: str = Field(pattern=NAME_PATTERN)
    base: RunConfig
    search: dict[str, Any] = Field(min_length=1)
    tune: TuneSettings = Field(default_factory=TuneSettings)


class AblationConfig(Strict):
    """A grid over one (or two) knobs × seeds; no searcher.  Each seed sets ``train.seed`` and
    ``data.seed`` (the labeled split) together."""

    name: str = Field(pattern=NAME_PATTERN)
    base: RunConfig
    grid: dict[str, list[Any]] = Field(min_length=1, max_length=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    metric: str = Field("test_acc", description="metric tabulated and plotted (final evaluation)")
    reference: dict[str, Any] | None = Field(
        None, description="the grid cell every other one is compared with, paired by seed (a value per grid knob); "
        "default: the base config's value of each knob when the grid holds it, else the knob's first value"
    )
    max_concurrent: int | None = Field(None, ge=1)
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        return check_storage(v, "storage", uri_ok=False)


def parse_study_file(path: str | Path, name: str | None = None, storage: str | None = None) -> StudyConfig:
    """Parse and type-check a study file (with ``--name`` / ``--storage`` applied); imports no torch or
    Ray, so a typo is refused at once.  The checks that need the data and models come after
    (``raykd.tune.study.check_study``)."""
    raw = read_yaml(path)
    expect_kind(raw, path, "study")
    if name is not None:
        raw["name"] = name
    if storage is not None:
        raw.setdefault("tune", {})["storage"] = storage
    return parse_config(raw, StudyConfig)


def parse_ablation_file(path: str | Path, storage: str | None = None) -> AblationConfig:
    """Parse and type-check an ablation file (``--storage`` applied); no torch, no Ray."""
    raw = read_yaml(path)
    expect_kind(raw, path, "ablation")
    if storage is not None:
        raw["storage"] = storage
    return parse_config(raw, AblationConfig)

