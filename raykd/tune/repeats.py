"""Seeds: what a seed sets, one teacher per seed, and seed repeats in a study (``tune.repeats: k``).

A seed ``s`` sets ``train.seed`` and ``data.seed`` (the labeled split) to ``s``, and with a
``teacher.run`` that run's ``train.seed`` and ``data.seed`` too, so a student never distils from a
teacher that saw another split's labels.  Ablations (one trial per grid cell and seed) and studies
with repeats share these rules and :func:`prepare_teachers`: every seed's teacher is trained once, on
the driver, before any trial, and shared by every trial of that seed.

**A study with repeats.**  Each Tune trial is one sampled configuration trained with the seeds
``base.train.seed + i`` for ``i < k`` (:func:`repeat_seeds`).  The trial process starts one Ray task
per seed (:func:`_seed_task`, at most ``parallel`` at a time, inside the trial's placement group) and
watches the seeds' run folders; each time every seed has evaluated a step, it reports one row to Tune
(:func:`aggregate_row`): every metric's mean over the seeds, ``<metric>_std`` and ``n_seeds``, and,
for a spread-aware ``tune.aggregate``, the figure the searcher and early stopping rank on
(``<metric>_mean_minus_std`` or ``<metric>_lower_ci``, :func:`raykd.report.seed_aggregate`).  So
Optuna sees one trial per configuration, and ASHA compares configurations on the aggregate at the
same step.  The trial folder::

    trials/<id>/config.yaml      the configuration at the first seed (``raykd study export`` writes it)
    trials/<id>/repeats.json     the seeds, the metric, the aggregate
    trials/<id>/progress.jsonl   one aggregated row per step every seed reached (``seed_values`` maps
                                 each seed to its value of the metric)
    trials/<id>/result.json      the last row once every seed finished, with ``per_seed`` (each
                                 seed's final metrics)
    trials/<id>/seeds/<seed>/    one run folder per seed (checkpoints in ``checkpoints/``)

A restarted trial (a lost node, ``raykd study resume`` after the driver died) keeps every seed that
finished (its ``result.json``) and continues the others from their latest checkpoint; a seed that
diverged fails the whole trial (``failed.json``, Optuna FAIL).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.config import RunConfig
from raykd.report import seed_aggregate
from raykd.train.runfolder import RunFolder
from raykd.train.teacher import prepare_teacher
from raykd.tune.records import REPEATS_FILE, SEEDS_DIR
from raykd.tune.resources import trials_that_fit
from raykd.tune.space import with_params

SEED_KEYS = ("train.seed", "data.seed")
TEACHER_SEED_KEYS = ("teacher.run.train.seed", "teacher.run.data.seed")
#: metrics whose spread over seeds is recorded (``<metric>_std``) besides the study's own
SPREAD_METRICS = ("val_acc", "test_acc", "test_acc_at_best_val")
#: how often the trial process looks at its seeds' progress (seconds)
POLL_S = 0.5


def seed_keys(base: RunConfig) -> tuple[str, ...]:
    """The dotted keys a seed sets: the student's, and a ``teacher.run``'s."""
    teacher = base.teacher
    return SEED_KEYS + (TEACHER_SEED_KEYS if teacher is not None and teacher.run is not None else ())


def seeded(base: RunConfig | dict[str, Any], seed: int) -> RunConfig:
    """``base`` with every key of :func:`seed_keys` set to ``seed``."""
    cfg = base if isinstance(base, RunConfig) else RunConfig.model_validate(base)
    return with_params(cfg, dict.fromkeys(seed_keys(cfg), seed))


def repeat_seeds(base: RunConfig, repeats: int) -> list[int]:
    """The seeds of a study with ``tune.repeats``: ``base.train.seed + i`` for ``i < repeats``."""
    return [base.train.seed + i for i in range(repeats)]


def prepare_teachers(base: RunConfig, seeds: list[int], folder: Path, address: str | None) -> dict[int, Path] | None:
    """Train (or find) every seed's teacher on the driver, before the trials; None without a teacher."""
    dirs = {seed: prepare_teacher(seeded(base, seed), folder, address) for seed in seeds}
    return None if all(d is None for d in dirs.values()) else dirs


def local_parallel(base: RunConfig, repeats: int) -> int:
    """How many seeds of one configuration run at once on a private local Ray: what this machine's
    CPUs (and GPUs, with ``use_gpu``) hold, at most ``repeats``."""
    s = base.scaling
    fits = math.floor((os.cpu_count() or 1) / (s.num_workers * s.cpus_per_worker) + 1e-6)
    if s.use_gpu:
        import torch

        fits = min(fits, math.floor(torch.cuda.device_count() / (s.num_workers * s.gpus_per_worker) + 1e-6))
    return max(1, min(repeats, fits))


def cluster_parallel(base: RunConfig, repeats: int, nodes: list[dict[str, float]]) -> int:
    """The same on a joined cluster: the runs of ``base`` that fit on ``nodes``, at most ``repeats``."""
    return max(1, min(repeats, trials_that_fit(base, nodes)))


@dataclass(frozen=True)
class RepeatPlan:
    """How a trial repeats its configuration: the seeds, how many run at once, and what it reports."""

    seeds: tuple[int, ...]
    parallel: int
    metric: str
    mode: str
    aggregate: str

    @property
    def selection(self) -> str:
        """The reported key the searcher ranks on (the study's ``tune.selection``)."""
        return self.metric if self.aggregate == "mean" else f"{self.metric}_{self.aggregate}"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def aggregate_row(rows: dict[int, dict[str, Any]], plan: RepeatPlan) -> dict[str, Any]:
    """One row from every seed's row of the same step (``{seed: row}``): each numeric metric that
    every seed reports, averaged (values equal on every seed, such as ``step`` or ``params``, are kept
    as they are); ``<m>_std`` (sample std) for the study's metric and :data:`SPREAD_METRICS`;
    ``n_seeds``; ``seed_values`` ({seed: the metric}); and the aggregate ``plan.selection``."""
    seeds = list(rows)
    out: dict[str, Any] = {}
    keys = [k for k in rows[seeds[0]] if k != "time" and all(_number(rows[s].get(k)) for s in seeds)]
    for key in keys:
        values = [rows[s][key] for s in seeds]
        out[key] = values[0] if all(v == values[0] for v in values) else statistics.fmean(values)
        if (key == plan.metric or key in SPREAD_METRICS) and len(values) > 1:
            out[f"{key}_std"] = statistics.stdev(values)
    out["n_seeds"] = len(seeds)
    out["seed_values"] = {str(s): rows[s].get(plan.metric) for s in seeds}
    if plan.metric in keys and plan.selection != plan.metric:
        out[plan.selection] = seed_aggregate([rows[s][plan.metric] for s in seeds], plan.aggregate, plan.mode)
    return out


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, int | float | str | bool)}


def _seed_task(cfg_raw: dict[str, Any], seed_dir: str, teacher_dir: str | None, watched: tuple[str, ...]) -> None:
    """One seed's run, as a Ray task: in-process (one worker, checkpoints in ``checkpoints/``) or
    its own ``TorchTrainer`` (DDP); a finished seed returns at once, a diverged one raises."""
    import torch

    from raykd.config import parse_run_config
    from raykd.train.context import LocalSession
    from raykd.train.loop import train_loop
    from raykd.train.trainer import build_trainer, raise_if_diverged

    cfg, folder = parse_run_config(cfg_raw), RunFolder(seed_dir)
    if folder.result() is not None:
        return
    raise_if_diverged(folder)
    folder.write_config(cfg)
    if cfg.scaling.num_workers == 1:
        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        session = LocalSession(folder.path, device, keep=cfg.train.keep_checkpoints)
        train_loop(cfg, session, folder.path, teacher_dir=teacher_dir, watched=watched)
    else:
        build_trainer(cfg, folder.path, teacher_dir, controller_failure_limit=3, watched=watched).fit()
    raise_if_diverged(folder)


def _launch(cfg: RunConfig, seed_dir: Path, teacher_dir: str | None, watched: tuple[str, ...]):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raykd.tune.resources import DRIVER_CPU

    s = cfg.scaling
    if s.num_workers == 1:  # in one of the trial's own bundles
        options: dict[str, Any] = {
            "num_cpus": s.cpus_per_worker, "num_gpus": s.gpus_per_worker if s.use_gpu else 0,
            "resources": dict(s.resources_per_worker),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(ray.util.get_current_placement_group(),
                                                                    placement_group_bundle_index=-1),
        }  # fmt: skip
    else:  # a Train driver; its workers reserve their own placement group, as a Train-in-Tune trial's do
        options = {"num_cpus": DRIVER_CPU, "scheduling_strategy": "DEFAULT"}
    task = ray.remote(_seed_task).options(max_retries=0, **options)
    return task.remote(cfg.model_dump(mode="json"), str(seed_dir), teacher_dir, watched)


class RepeatedTrial:
    """The trial process's side of a repeated configuration (see the module docstring)."""

    def __init__(self, cfg: RunConfig, trial_dir: Path, plan: RepeatPlan, teachers: dict[Any, str | None],
                 watched: tuple[str, ...]):  # fmt: skip
        self.cfg, self.plan, self.watched = cfg, plan, watched
        self.folder = RunFolder(trial_dir)
        self.configs = {s: seeded(cfg, s) for s in plan.seeds}
        self.teachers = {s: teachers.get(s, teachers.get(None)) for s in plan.seeds}
        self.seeds = {s: RunFolder(trial_dir / SEEDS_DIR / str(s)) for s in plan.seeds}
        self.reported = 0

    def _rows(self) -> dict[int, dict[int, dict[str, Any]]]:
        """Each seed's rows by step (its result counts as the row of the last step)."""
        out = {}
        for s, folder in self.seeds.items():
            rows = {r["step"]: r for r in folder.progress() if isinstance(r.get("step"), int)}
            result = folder.result()
            if result is not None and isinstance(result.get("step"), int):
                rows[result["step"]] = result
            out[s] = rows
        return out

    def report_new_steps(self) -> None:
        """Report (and append to the trial's progress) every step all seeds reached since the last."""
        from ray import tune

        rows = self._rows()
        common = sorted(set.intersection(*(set(r) for r in rows.values())))
        for step in (s for s in common if s > self.reported):
            row = aggregate_row({s: rows[s][step] for s in self.plan.seeds}, self.plan)
            if step == self.cfg.train.steps:  # before the report: a scheduler may end the trial at its last one
                per_seed = {str(s): _scalars(rows[s][step]) for s in self.plan.seeds}
                self.folder.write_result({**row, "per_seed": per_seed})
            self.folder.append_progress(row)
            tune.report(_scalars(row))
            self.reported = step

    def _fail_if_diverged(self, seed: int) -> None:
        from raykd.errors import DivergedError

        failure = self.seeds[seed].failure()
        if failure is not None:
            reason = f"seed {seed}: {failure.get('reason')}"
            self.folder.write_failure({"reason": reason, "step": failure.get("step"), "seed": seed})
            raise DivergedError(reason, failure.get("step"), str(self.seeds[seed].path))

    def run(self) -> dict[str, Any]:
        import ray
        from ray import tune

        from raykd.train.trainer import raise_if_diverged

        done = self.folder.result()
        if done is not None:  # every seed finished before the driver was interrupted: never re-run
            tune.report(_scalars(done))
            return done
        raise_if_diverged(self.folder)
        self.folder.write_config(self.configs[self.plan.seeds[0]])
        (self.folder.path / REPEATS_FILE).write_text(json.dumps(
            {"seeds": list(self.plan.seeds), "metric": self.plan.metric, "mode": self.plan.mode,
             "aggregate": self.plan.aggregate, "selection": self.plan.selection}, indent=2) + "\n")  # fmt: skip
        self.reported = self.folder.last_step() or 0
        for s in self.plan.seeds:
            self._fail_if_diverged(s)
        waiting = [s for s in self.plan.seeds if self.seeds[s].result() is None]
        running: dict[Any, int] = {}
        try:
            while waiting or running:
                while waiting and len(running) < self.plan.parallel:
                    s = waiting.pop(0)
                    running[_launch(self.configs[s], self.seeds[s].path, self.teachers[s], self.watched)] = s
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    s = running.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a diverged seed fails the trial; others propagate
                        self._fail_if_diverged(s)
                        raise RuntimeError(f"seed {s} of this configuration crashed: {e}") from e
                self.report_new_steps()
            self.report_new_steps()
        finally:
            for ref in running:  # a trial stopped early or failing: its other seeds stop too
                ray.cancel(ref, force=True)
        return self.folder.result() or {}
