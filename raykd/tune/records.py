"""Reading a study or ablation folder — while it runs and after — and the layout of its files.

A study named N lands in ``<storage>/N/``::

    study.yaml            the resolved study config (base with defaults merged)
    optuna.db             the Optuna study (sqlite; ``optuna-dashboard sqlite:///.../optuna.db``)
    tune/                 the Ray Tune experiment (tuner.pkl, experiment state, per-trial Tune logs
                          with TensorBoard event files, inline trials' checkpoints)
    trials/<trial_id>/    one run folder per trial (raykd.train.runfolder): config.yaml,
                          progress.jsonl, result.json; cost.json (what the trial has cost so far:
                          wall seconds and device-seconds, kept by the driver, raykd.tune.budget);
                          with tune.repeats, repeats.json and seeds/<seed>/ (one run folder per
                          seed; the trial's own progress and result are their aggregate,
                          raykd.tune.repeats)
    best.yaml             the best trial's complete run config (+ metrics and provenance)
    study.md, study_trials.csv, *.png   tables and plots (``raykd report``)

An ablation folder is the same with ``ablation.yaml`` and ``ablation.csv/.md/.png``.  Ranking trials
is :func:`raykd.report.rank_trials`, the one ranking that status, report and export share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raykd.report import rank_trials
from raykd.train.runfolder import CONFIG_FILE, RunFolder
from raykd.tune.lock import StudyLock

STUDY_FILE = "study.yaml"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
OPTUNA_DB = "optuna.db"
#: trial id -> Tune status, kept by the cloud-storage mirror (the Tune experiment state is in the bucket)
MIRRORED_STATES = "trial_states.json"
#: a trial's wall time and device-seconds so far (written by the driver's :class:`raykd.tune.budget.CostMeter`)
COST_FILE = "cost.json"
#: a trial of a study with seed repeats (raykd.tune.repeats): its seeds and aggregate, and one run folder per seed
REPEATS_FILE = "repeats.json"
SEEDS_DIR = "seeds"

__all__ = ["COST_FILE", "MIRRORED_STATES", "OPTUNA_DB", "REPEATS_FILE", "SEEDS_DIR", "STUDY_FILE", "TRIALS_DIR",
           "TUNE_DIR", "best_trial", "collect_trials", "rank_trials", "seed_records", "study_spend",
           "trial_cost"]  # fmt: skip


def _dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def trial_cost(trial_dir: Path) -> dict[str, Any] | None:
    """A trial's ``cost.json`` (``wall_s``, ``device``, ``held``, ``device_s``), or None when it has
    none yet or it cannot be read."""
    try:
        cost = json.loads((Path(trial_dir) / COST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = isinstance(cost, dict) and all(isinstance(cost.get(k), int | float) for k in ("wall_s", "device_s"))
    return cost if ok else None


def seed_records(trial_dir: Path) -> dict[str, dict[str, Any]] | None:
    """A repeated trial's seeds, ``{seed: {"state": ..., <last metrics>}}`` from their run folders
    (state ``done``, ``failed`` or ``unfinished``), in seed order; None for a trial without repeats."""
    try:
        info = json.loads((Path(trial_dir) / REPEATS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    out = {}
    for seed in info.get("seeds", []) if isinstance(info, dict) else []:
        run = RunFolder(Path(trial_dir) / SEEDS_DIR / str(seed))
        result = run.result()
        last = result or (run.progress() or [{}])[-1]
        state = "done" if result is not None else "failed" if run.failure() is not None else "unfinished"
        out[str(seed)] = {"state": state, **{k: v for k, v in last.items()
                                             if isinstance(v, int | float) and not isinstance(v, bool)}}  # fmt: skip
    return out


def study_spend(study_dir: Path) -> dict[str, Any]:
    """What a study's trials have cost so far, from their ``cost.json``: ``wall_s`` and ``device_s``
    summed, ``device`` (``"GPU"`` or ``"CPU"``, the kind the trials hold; ``"GPU/CPU"`` if mixed, None
    before any) and ``trials`` (how many have a cost)."""
    costs = [c for p in sorted((Path(study_dir) / TRIALS_DIR).glob(f"*/{COST_FILE}")) if (c := trial_cost(p.parent))]
    kinds = sorted({str(c.get("device")) for c in costs}, reverse=True)
    return {"wall_s": sum(c["wall_s"] for c in costs), "device_s": sum(c["device_s"] for c in costs),
            "device": "/".join(kinds) or None, "trials": len(costs)}  # fmt: skip


def _tune_states(study_dir: Path) -> dict[str, str]:
    """Trial id → Tune status from the newest experiment-state file (empty if none yet); with cloud
    storage, from the states the driver's :class:`TrialMirror` keeps in the working copy."""
    files = sorted((study_dir / TUNE_DIR).glob("experiment_state-*.json"))
    if not files:
        try:
            return json.loads((study_dir / MIRRORED_STATES).read_text())
        except (json.JSONDecodeError, OSError):
            return {}
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    out = {}
    for entry in state.get("trial_data", []):
        try:
            meta = json.loads(entry[1]) if isinstance(entry, list) else {}
            data = json.loads(entry[0]) if isinstance(entry, list) else entry
        except (json.JSONDecodeError, TypeError, IndexError):
            continue
        trial_id = data.get("trial_id")
        status = meta.get("status") or data.get("status")
        if trial_id and status:
            out[trial_id] = status
    return out


def collect_trials(
    study_dir: Path, keys: list[str], steps: int, driver_alive: bool | None = None
) -> list[dict[str, Any]]:
    """Trial records (trial_id, state, params, metrics, history) from the trial folders, in the order
    the trials started (their config.yaml's time, then their id).

    ``cost`` is the trial's ``cost.json`` (:func:`trial_cost`), or None; ``seeds`` (a trial of a
    study with repeats only) is :func:`seed_records`.
    state: ``done`` (reached train.steps), ``stopped`` (ended early by the scheduler), ``running``,
    ``failed`` (diverged: its ``reason`` is in the record), ``error`` (crashed), or ``interrupted``
    (the driver died or was stopped while it ran; ``raykd study resume`` continues it).
    A trial folder whose files cannot be read is skipped with a warning naming the file; the rest of
    the study still reads.  A trial Tune last saw running counts as ``running`` only while a driver
    holds the study's lock (``driver_alive``; None = look at the lock), else as ``interrupted``.
    """
    tune_states = _tune_states(study_dir)
    if driver_alive is None:
        driver_alive = StudyLock(study_dir).holder() is not None
    live = {"RUNNING": "running", "PENDING": "pending", "PAUSED": "paused"} if driver_alive else {}
    folders = sorted((study_dir / TRIALS_DIR).glob(f"*/{CONFIG_FILE}"),
                     key=lambda p: (p.stat().st_mtime, p.parent.name))  # fmt: skip
    records = []
    for cfg_path in folders:
        run = RunFolder(cfg_path.parent)
        cfg = run.config_raw()
        if cfg is None:
            continue
        history = run.progress()
        result = run.result()
        failure = run.failure() if result is None else None
        tune_state = tune_states.get(run.path.name, "")
        if result is not None:
            metrics, state = result, "done"
        elif failure is not None:
            metrics, state = history[-1] if history else {}, "failed"
        else:
            metrics = history[-1] if history else {}
            state = {**live, "ERROR": "error", "TERMINATED": "stopped"}.get(tune_state, "interrupted")
        records.append({"trial_id": run.path.name, "state": state, "params": {k: _dotted(cfg, k) for k in keys},
                        "metrics": metrics, "history": history, "cost": trial_cost(run.path)})  # fmt: skip
        if (seeds := seed_records(run.path)) is not None:
            records[-1]["seeds"] = seeds
        if failure is not None:
            records[-1]["reason"] = f"diverged at step {failure.get('step')}: {failure.get('reason')}"
    return records


def best_trial(records: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial by the one ranking (:func:`raykd.report.rank_trials`), or None."""
    ranked = rank_trials(records, metric, mode)
    return ranked[0] if ranked else None
