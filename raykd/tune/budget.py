"""What a study costs, and its budget (``tune.budget_hours``).

A trial's cost is its wall time (from the moment Tune starts its process until it ends, summed over
restarts and resumes) times what it holds: **GPU-seconds** when its workers hold GPUs
(``scaling.use_gpu``: ``num_workers × gpus_per_worker``), else **CPU-seconds**
(``num_workers × cpus_per_worker``, plus the Train-in-Tune driver's sliver); with seed repeats,
times the seeds it runs at once (its placement group holds that many runs).  The study driver's
:class:`CostMeter` (a Tune callback) keeps it in ``trials/<id>/cost.json``, updated at each report,
every :data:`REFRESH_S` seconds while the trial runs, and when it ends, and adds ``wall_s``,
``device_s`` and ``device`` to the trial's ``result.json``.  A study's spend is the sum over its
trial folders (:func:`raykd.tune.records.study_spend`), so a resumed study counts what it had
already spent.

With ``tune.budget_hours``, the searcher (:class:`raykd.tune.search.RaykdOptunaSearch`) starts no new
trial once the spend reaches the budget: it answers Tune with ``Searcher.FINISHED``; running trials
finish.  A running trial counts up to its last refresh (at most :data:`REFRESH_S` behind).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raykd.config import RunConfig
from raykd.train.runfolder import RunFolder
from raykd.tune.records import COST_FILE, TRIALS_DIR, study_spend, trial_cost
from raykd.tune.resources import trial_needs
from raykd.tune.space import with_params

__all__ = ["CostMeter", "budget_reached", "held", "spend_line"]

#: how often (seconds) the driver refreshes every running trial's ``cost.json`` between its reports
REFRESH_S = 10.0


def held(cfg: RunConfig, parallel: int | None = None) -> tuple[str, float]:
    """``("GPU", n)`` when a trial of ``cfg`` holds GPUs, else ``("CPU", n)``: what its cost counts
    (``parallel``: its seeds that run at once, with seed repeats)."""
    need = trial_needs(cfg, parallel)
    if need.get("GPU", 0) > 0:
        return "GPU", float(need["GPU"])
    return "CPU", float(need.get("CPU", 0.0))


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


class CostMeter(Callback):
    """Tune callback of a study driver: each trial's wall time and device-seconds in its folder."""

    def __init__(self, study_dir: Path, base: RunConfig, keys: list[str], parallel: int | None = None):
        self.study_dir, self.base, self.keys = Path(study_dir).resolve(), base.model_dump(mode="json"), keys
        self.parallel = parallel
        self._prior: dict[str, float] = {}  # seconds of earlier attempts
        self._started: dict[str, float] = {}  # start of the current attempt
        self._held: dict[str, tuple[str, float]] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: no live attempts
        return {**self.__dict__, "_prior": {}, "_started": {}, "_held": {}}

    def _dir(self, trial) -> Path:
        return self.study_dir / TRIALS_DIR / trial.trial_id

    def _wall(self, trial_id: str) -> float:
        started = self._started.get(trial_id)
        return self._prior.get(trial_id, 0.0) + (time.time() - started if started is not None else 0.0)

    def _write(self, trial) -> dict[str, Any]:
        tid = trial.trial_id
        if tid not in self._held:
            try:
                cfg = with_params(self.base, {k: trial.config[k] for k in self.keys})
                self._held[tid] = held(cfg, getattr(self, "parallel", None))
            except Exception:  # noqa: BLE001 - an odd config must not stop the study; count the base's
                self._held[tid] = held(RunConfig.model_validate(self.base), getattr(self, "parallel", None))
        kind, n = self._held[tid]
        wall = self._wall(tid)
        cost = {"wall_s": round(wall, 3), "device": kind, "held": n, "device_s": round(wall * n, 3)}
        try:
            _write_json(self._dir(trial) / COST_FILE, cost)
        except OSError:
            pass
        return cost

    def _close_attempt(self, trial_id: str) -> None:
        started = self._started.pop(trial_id, None)
        if started is not None:
            self._prior[trial_id] = self._prior.get(trial_id, 0.0) + time.time() - started

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        self._close_attempt(tid)
        if tid not in self._prior:  # a trial of an earlier driver (study resume): what it had cost
            earlier = trial_cost(self._dir(trial))
            self._prior[tid] = float(earlier["wall_s"]) if earlier else 0.0
        self._started[tid] = time.time()
        self._write(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self._started:
            self._write(trial)

    def on_step_end(self, iteration, trials, **info):
        """Between reports too (every :data:`REFRESH_S`): a trial whose reports are far apart (long
        evaluation intervals; seed repeats, which report once every seed reached a step) loses at
        most that much of its cost when the driver is stopped."""
        now = time.time()
        if now - getattr(self, "_refreshed", 0.0) < REFRESH_S:
            return
        self._refreshed = now
        for trial in trials:
            if trial.trial_id in self._started:
                self._write(trial)

    def _end(self, trial) -> None:
        if trial.trial_id not in self._started:
            return
        self._close_attempt(trial.trial_id)
        cost = self._write(trial)
        folder = RunFolder(self._dir(trial))
        if folder.result() is not None:
            folder.update_result(wall_s=cost["wall_s"], device_s=cost["device_s"], device=cost["device"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._close_attempt(trial.trial_id)
        self._write(trial)


def spend_line(study_dir: Path, budget_hours: float | None, kind: str) -> str:
    """``spent 0.0123 CPU-hours (44 s wall) over 3 trials[, budget 1 CPU-hours]``."""
    s = study_spend(study_dir)
    unit = f"{s['device'] or kind}-hours"
    if not s["trials"] and any((study_dir / TRIALS_DIR).glob("*/")):
        return "spend: not recorded (these trials ran before raykd kept trials/<id>/cost.json)"
    line = f"spent {s['device_s'] / 3600:.4g} {unit} ({s['wall_s']:.0f} s of trial wall time) over {s['trials']} trials"
    return line + (f", budget {budget_hours:g} {unit}" if budget_hours is not None else "")


def budget_reached(study_dir: Path, budget_hours: float | None) -> str | None:
    """``budget reached: X of Y device-hours`` once a study's spend reaches its budget, else None."""
    if budget_hours is None:
        return None
    s = study_spend(study_dir)
    if s["device_s"] < budget_hours * 3600:
        return None
    return f"budget reached: {s['device_s'] / 3600:.4g} of {budget_hours:g} {s['device'] or 'device'}-hours"
