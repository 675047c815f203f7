"""The Optuna side of a study: what ``optuna.db`` holds and how it stays true to the trial folders.

:class:`RaykdOptunaSearch` is Ray Tune's ``OptunaSearch`` with five additions:

* every Optuna trial carries user attributes linking it to raykd: ``raykd_trial_id`` (the trial
  folder under ``trials/``), and once it ends ``raykd_state`` (``done``, ``stopped``, ``failed``),
  ``step``, ``test_acc`` / ``val_acc`` and, for a diverged trial, ``raykd_failure`` (the reason);
* the study carries the metric's name (``set_metric_names``, so optuna-dashboard shows ``val_acc``
  rather than "Objective 0") and ``raykd_metric`` / ``raykd_mode`` user attributes;
* intermediate values use the **training step** and skip non-finite values (Optuna refuses NaN,
  which used to leave trials RUNNING forever); a non-finite final value is told as FAIL;
* a trial that failed and is re-run to completion by ``raykd study resume`` is added again as a
  COMPLETE trial (``rerun_of`` names the failed one), so Optuna agrees with the study folder;
* several objectives (``tune.objectives``): ``metric`` and ``mode`` are lists, Optuna's TPE
  samples for all of them, the study's metric names are all of them, and no intermediate values
  are reported (Optuna keeps none for a multi-objective study);
* with a budget (``tune.budget_hours``), it answers ``Searcher.FINISHED`` once the study's spend
  (the trial folders' ``cost.json``, :mod:`raykd.tune.budget`) reaches it: no new trial starts.

:func:`rebuild_optuna` writes a fresh ``optuna.db`` from the trial folders of a finished study.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from raykd.train.runfolder import RunFolder
from raykd.tune.records import TRIALS_DIR, study_spend
from raykd.tune.space import Dist

_ATTR_METRICS = ("step", "test_acc", "val_acc", "test_acc_at_best_val")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def describe_study(ot_study: optuna.Study, metric: str | list[str], mode: str | list[str]) -> None:
    """Name the objective(s) and record how the study selects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ot_study.set_metric_names(list(metric) if isinstance(metric, list) else [metric])
    ot_study.set_user_attr("raykd_metric", metric)
    ot_study.set_user_attr("raykd_mode", mode)


def distributions(space: dict[str, Dist]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a resolved search space (the same ones ``space.suggest`` asks for)."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, d in space.items():
        if d.kind in ("uniform", "loguniform"):
            out[key] = optuna.distributions.FloatDistribution(*d.args, log=d.kind == "loguniform")
        elif d.kind in ("int", "logint"):
            out[key] = optuna.distributions.IntDistribution(*d.args, log=d.kind == "logint")
        else:
            out[key] = optuna.distributions.CategoricalDistribution(list(d.args))
    return out


class RaykdOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that keeps ``optuna.db`` linked to and in agreement with the trial folders."""

    def __init__(self, *args: Any, study_dir: Path, budget_hours: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._study_dir = str(Path(study_dir).resolve())
        self._budget_s = budget_hours * 3600.0 if budget_hours is not None else None
        if self._ot_study is not None:
            describe_study(self._ot_study, self._metric, self._mode)

    def suggest(self, trial_id: str) -> dict | str | None:
        budget_s = getattr(self, "_budget_s", None)  # None in a searcher pickled by an older raykd
        if budget_s is not None and study_spend(Path(self._study_dir))["device_s"] >= budget_s:
            return Searcher.FINISHED  # the budget is spent: Tune starts no new trial
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr("raykd_trial_id", trial_id)
        return params

    def _values(self, result: dict | None) -> list[Any]:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        return [result.get(m) for m in metrics] if result else [None] * len(metrics)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list):
            return  # a multi-objective Optuna study keeps no intermediate values
        value, step = result.get(self.metric), result.get("step", result.get("training_iteration"))
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials or not _finite(value) or not isinstance(step, int):
            return
        try:
            ot_trial.report(float(value), step)
        except Exception:  # noqa: BLE001 - a step re-reported after a restart is already recorded
            pass

    def _attributes(self, trial_id: str, result: dict | None, error: bool) -> dict[str, Any]:
        run = RunFolder(Path(self._study_dir) / TRIALS_DIR / trial_id)
        failure = run.failure()
        attrs: dict[str, Any] = {k: result[k] for k in _ATTR_METRICS if result and _finite(result.get(k))}
        if failure is not None:
            attrs.update(raykd_state="failed", raykd_failure=str(failure.get("reason")))
        elif error:
            attrs["raykd_state"] = "error"
        else:
            attrs["raykd_state"] = "done" if run.result() is not None else "stopped"
        return attrs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return
        if result is not None and not all(_finite(v) for v in self._values(result)):
            result, error = None, True  # Optuna refuses NaN; a non-finite value is a failed trial
        attrs = self._attributes(trial_id, result, error)
        if trial_id in self._completed_trials:  # re-run by `study resume` after it failed
            if not error and result is not None:
                self._add_rerun(ot_trial, trial_id, [float(v) for v in self._values(result)], attrs)
            return
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)
        super().on_trial_complete(trial_id, result=result, error=error)

    def _add_rerun(self, old: optuna.Trial, trial_id: str, values: list[float], attrs: dict[str, Any]) -> None:
        frozen = next((t for t in self._ot_study.get_trials(deepcopy=False) if t.number == old.number), None)
        if frozen is None or frozen.state == optuna.trial.TrialState.COMPLETE:
            return
        trial = optuna.trial.create_trial(params=frozen.params, distributions=frozen.distributions, values=values,
                                          user_attrs={**attrs, "raykd_trial_id": trial_id,
                                                      "rerun_of": frozen.number})  # fmt: skip
        self._ot_study.add_trial(trial)


def rebuild_optuna(storage: str, study_name: str, metric: str, mode: str, space: dict[str, Dist],
                   records: list[dict[str, Any]]) -> optuna.Study:  # fmt: skip
    """A fresh Optuna study in ``storage`` holding every trial folder of ``records`` (its params,
    value and state: done → COMPLETE, stopped → PRUNED, failed / error → FAIL)."""
    study = optuna.create_study(storage=storage, study_name=study_name,
                                direction="maximize" if mode == "max" else "minimize")  # fmt: skip
    describe_study(study, metric, mode)
    dists = distributions(space)
    states = {"done": optuna.trial.TrialState.COMPLETE, "stopped": optuna.trial.TrialState.PRUNED}
    for r in records:
        state = states.get(r["state"], optuna.trial.TrialState.FAIL)
        value = r["metrics"].get(metric)
        if state == optuna.trial.TrialState.COMPLETE and not _finite(value):
            state = optuna.trial.TrialState.FAIL
        params = {k: v for k, v in r["params"].items() if k in dists}
        attrs = {"raykd_trial_id": r["trial_id"], "raykd_state": r["state"], "rebuilt": True}
        attrs.update({k: r["metrics"][k] for k in _ATTR_METRICS if _finite(r["metrics"].get(k))})
        trial = optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, user_attrs=attrs, state=state,
            value=float(value) if state == optuna.trial.TrialState.COMPLETE else None,
        )  # fmt: skip
        study.add_trial(trial)
    return study
