"""Ablations: a grid over one (or two) knobs × seeds, run as Ray Tune trials without a searcher.

An ablation named N lands in ``<storage>/N/``: ``ablation.yaml`` (resolved), ``tune/`` (the Tune
experiment), ``trials/<trial_id>/`` (run folders) and the outputs ``ablation.csv`` (mean ± std per
grid cell), ``ablation.md`` and ``ablation.png``.  Each seed sets ``train.seed`` and ``data.seed``
together (a different labeled split and initialisation per seed).  A ``teacher.run`` follows the seed
too (its ``data.seed`` and ``train.seed``): the driver trains one teacher per seed, before any trial,
so a student never distils from a teacher that saw another split's labels.  A ``teacher.checkpoint``
is the same fixed teacher for every seed.  Running the same command again after an interruption
resumes the grid; finished trials are kept.  Every cell is also compared with a reference cell
(``reference``, default the base config's values), paired by seed, in the tables.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raykd.config import read_yaml
from raykd.errors import ConfigError
from raykd.train.preflight import preflight
from raykd.train.runfolder import first_difference
from raykd.tune import repeats
from raykd.tune.config import AblationConfig, parse_ablation_file
from raykd.tune.lock import StudyLock
from raykd.tune.progress import NoTuneEvents, ProgressTable
from raykd.tune.records import TUNE_DIR, collect_trials
from raykd.tune.resources import cluster_nodes, concurrency, init_ray_for
from raykd.tune.space import check_key, check_metric, declared_log_scaled, with_params
from raykd.tune.storage import check_shared
from raykd.tune.trial import make_trainable, trial_dirname

ABLATION_FILE = "ablation.yaml"
def seed_keys(abl: AblationConfig) -> tuple[str, ...]:
    """The dotted keys a trial's seed sets: the student's, and a ``teacher.run``'s."""
    return repeats.seed_keys(abl.base)


def prepare_teachers(abl: AblationConfig, folder: Path, address: str | None) -> dict[int, Path] | None:
    """Train (or find) every seed's teacher on the driver before the trials; None without a teacher."""
    return repeats.prepare_teachers(abl.base, abl.seeds, folder, address)


def load_ablation(path: str | Path, storage: str | None = None) -> AblationConfig:
    abl = parse_ablation_file(path, storage=storage)
    check_ablation(abl)
    return abl


def check_ablation(abl: AblationConfig, address: str | None = None) -> None:
    """Grid keys exist, every value gives a valid run config, the metric is reported, data exists."""
    for key, values in abl.grid.items():
        check_key(abl.base, key, field=f"grid.{key}")
        if not values:
            raise ConfigError(f"grid.{key}", "needs at least one value")
        for v in values:
            try:
                with_params(abl.base, {key: v})
            except ConfigError as e:
                raise ConfigError(f"grid.{key}", f"value {v!r} is invalid for {e.field}: {e.message}") from None
    check_metric(abl.base, abl.metric, field="metric")
    for key, value in (abl.reference or {}).items():
        if key not in abl.grid:
            raise ConfigError(f"reference.{key}", f"is not a grid knob; give a value for each of {', '.join(abl.grid)}")
        if value not in abl.grid[key]:
            raise ConfigError(f"reference.{key}", f"{value!r} is not in the grid; choose one of {abl.grid[key]}")
    preflight(abl.base, address, prefix="base.")


def reference_cell(abl: AblationConfig) -> list[Any]:
    """The grid cell the others are compared with: ``reference``'s value of each knob, else the base
    config's value when the grid holds it, else the knob's first grid value."""
    raw = abl.base.model_dump(mode="json")
    cell = []
    for key, values in abl.grid.items():
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        given = (abl.reference or {}).get(key, node)
        cell.append(given if given in values else values[0])
    return cell


def folder_of(abl: AblationConfig) -> Path:
    return Path(abl.storage or "runs") / abl.name


def records(folder: Path, abl: AblationConfig) -> list[dict[str, Any]]:
    """Trial records with the grid knobs and ``seed`` as params."""
    recs = collect_trials(folder, [*abl.grid, "train.seed"], abl.base.train.steps)
    for r in recs:
        r["params"]["seed"] = r["params"].pop("train.seed")
    return recs


def write_report(folder: Path, abl: AblationConfig) -> dict[str, Path]:
    from raykd.report import write_ablation_report

    knobs = list(abl.grid)
    return write_ablation_report(records(folder, abl), knobs, abl.metric, folder,
                                 log_keys=declared_log_scaled(abl.base, knobs),
                                 reference=reference_cell(abl))  # fmt: skip


def run(abl: AblationConfig, address: str | None = None) -> int:
    """``raykd ablate``: run (or resume) the grid, then write the CSV, Markdown table and plot.

    Before Ray starts: the folder's lock (one driver at a time) and, when the folder holds an
    ablation already, that it is this one (the first difference is named)."""
    folder = folder_of(abl)
    lock = StudyLock(folder)
    lock.check_free(f"ablation {abl.name!r}")
    resuming = (folder / TUNE_DIR / "tuner.pkl").exists()
    if resuming:
        old = read_yaml(folder / ABLATION_FILE)
        diff = first_difference(old, abl.model_dump(mode="json"))
        if diff:
            raise ConfigError("name", f"{folder} holds a different ablation ({diff}); pick another name or --storage "
                              "to keep both")  # fmt: skip
    lock.acquire(f"ablation {abl.name!r}")
    try:
        return _run_locked(abl, folder, resuming, address)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with the same command: raykd ablate <file> (folder {folder})", file=sys.stderr)
        return 130
    finally:
        lock.release()


def _run_locked(abl: AblationConfig, folder: Path, resuming: bool, address: str | None) -> int:
    from ray import tune

    keys = list(abl.grid)
    n_trials = len(abl.seeds) * _cells(abl)
    print("starting Ray…" if not (address or os.environ.get("RAY_ADDRESS")) else "joining Ray…", flush=True)
    cluster = init_ray_for(abl.base, address)
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    max_conc = concurrency(abl.base, n_trials, abl.max_concurrent, cluster, cluster_nodes(), joined)
    tune_dir = (folder / TUNE_DIR).resolve()
    check_shared(folder)  # a multi-node cluster: every node must see the ablation folder
    teacher_dirs = prepare_teachers(abl, folder, address)
    trainable = make_trainable(abl.base, keys, folder, seed_keys=seed_keys(abl), teacher_dir=teacher_dirs,
                               watched=(abl.metric,))  # fmt: skip
    started = time.time()
    if resuming and tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming ablation {abl.name} in {folder} (finished trials are kept)", flush=True)
        tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
    else:
        (folder / ABLATION_FILE).write_text(yaml.safe_dump(abl.model_dump(mode="json"), sort_keys=False))
        grid = " x ".join(f"{k} {v}" for k, v in abl.grid.items())
        print(f"raykd ablate {abl.name}: {grid} x seeds {abl.seeds} = {n_trials} runs of {abl.base.method.name} on "
              f"{abl.base.data.name}, {max_conc} at a time; folder {folder}", flush=True)  # fmt: skip
        param_space = {k: tune.grid_search(v) for k, v in abl.grid.items()}
        param_space["seed"] = tune.grid_search(abl.seeds)
        tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=max_conc,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=str(folder.resolve()), verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=abl.base.train.keep_checkpoints),
                callbacks=[ProgressTable([*keys, "seed"], abl.metric, "max", abl.base.train.steps), NoTuneEvents()],
            ),
        ).fit()  # fmt: skip
    paths = write_report(folder, abl)
    recs = records(folder, abl)
    done = sum(r["state"] == "done" for r in recs)
    print(f"\nablation {abl.name}: {done}/{n_trials} runs finished in {time.time() - started:.0f} s")
    for r in recs:
        if r.get("reason"):
            print(f"  run {r['trial_id']} failed: {r['reason']}")
    print(Path(paths["md"]).read_text())
    print(f"table: {paths['csv']}\nplot:  {paths['png']}")
    return 0 if done == n_trials else 1


def _cells(abl: AblationConfig) -> int:
    n = 1
    for values in abl.grid.values():
        n *= len(values)
    return n
