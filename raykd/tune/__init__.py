"""Studies and ablations: Ray Tune + Optuna above the training layer.

The public surface (imported lazily, so ``from raykd.tune import StudyConfig`` does not start Ray
Tune's import machinery): the file formats :class:`StudyConfig`, :class:`AblationConfig`; the
commands in :mod:`raykd.tune.study` (``run``, ``resume``, ``status_text``, ``export``,
``write_report``) and :mod:`raykd.tune.ablation`; reading a folder (:func:`collect_trials`,
:func:`rank_trials`, :func:`best_trial`).  Modules: ``config`` (files), ``space`` (search DSL),
``resources`` (what fits), ``trial`` (the trainable), ``repeats`` (seeds, and seed repeats),
``progress`` (live table), ``mirror`` (cloud storage), ``records`` (folder layout and reading),
``storage`` (paths and URIs), ``study`` and ``ablation`` (the commands).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "StudyConfig": "raykd.tune.config",
    "AblationConfig": "raykd.tune.config",
    "TuneSettings": "raykd.tune.config",
    "collect_trials": "raykd.tune.records",
    "rank_trials": "raykd.tune.records",
    "best_trial": "raykd.tune.records",
    "STUDY_FILE": "raykd.tune.records",
    "load_study": "raykd.tune.study",
    "run_study": "raykd.tune.study:run",
    "resume_study": "raykd.tune.study:resume",
    "export": "raykd.tune.study",
    "status_text": "raykd.tune.study",
    "write_report": "raykd.tune.study",
    "ABLATION_FILE": "raykd.tune.ablation",
    "load_ablation": "raykd.tune.ablation",
    "run_ablation": "raykd.tune.ablation:run",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'raykd.tune' has no attribute {name!r}")
    module, _, attr = _PUBLIC[name].partition(":")
    return getattr(importlib.import_module(module), attr or name)
