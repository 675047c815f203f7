"""Studies: Ray Tune + Optuna search over a base run config; the ``raykd study`` commands.

``run`` starts a study, ``resume`` finishes an interrupted one, ``status_text`` / ``export`` /
``write_report`` read its folder (layout in :mod:`raykd.tune.records`).  The pieces live beside it:
:mod:`raykd.tune.config` (the study file), :mod:`raykd.tune.space` (the search DSL),
:mod:`raykd.tune.resources` (what fits), :mod:`raykd.tune.trial` (the trainable),
:mod:`raykd.tune.progress` (the live table), :mod:`raykd.tune.mirror` (cloud storage) and
:mod:`raykd.tune.records` (reading trial folders; the ranking is :func:`raykd.report.rank_trials`).

``--storage`` may be a shared folder or a cloud URI (raykd/tune/storage.py, docs/cluster.md): with a
URI, Ray writes ``tune/`` and the checkpoints to ``<uri>/N/``, the driver keeps the rest in its working
copy ``runs/N/`` (trial folders rebuilt from Tune's results) and copies it to ``<uri>/N/``.

Selection uses ``tune.metric`` (default ``val_acc``, the held-out validation split) and reports test
accuracy separately; see docs/studies.md.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

import raykd
from raykd.config import RunConfig, dump_run_config, parse_config, read_yaml
from raykd.errors import ConfigError, raykd_command
from raykd.report import format_mean_std
from raykd.train.preflight import preflight
from raykd.train.runfolder import RunFolder
from raykd.train.teacher import prepare_teacher
from raykd.tune.budget import CostMeter, budget_reached, held, spend_line
from raykd.tune.config import StudyConfig, parse_study_file
from raykd.tune.lock import StudyLock
from raykd.tune.mirror import _WORKING_COPY, TrialMirror
from raykd.tune.progress import NoTuneEvents, ProgressTable, _fmt, render_table
from raykd.tune.records import OPTUNA_DB, STUDY_FILE, TRIALS_DIR, TUNE_DIR, collect_trials, rank_trials
from raykd.tune.repeats import RepeatPlan, cluster_parallel, local_parallel, prepare_teachers, repeat_seeds
from raykd.tune.resources import cluster_nodes, concurrency, init_ray_for, trials_that_fit
from raykd.tune.space import Dist, check_metric, log_scaled, resolve_search, suggest
from raykd.tune.storage import check_shared, is_uri, join, upload, uri_exists
from raykd.tune.trial import make_trainable, trial_dirname

__all__ = ["build_tuner", "check_study", "export", "export_pareto", "load_study", "resume", "run", "status_text",
           "write_report"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# loading and checks (all before Ray starts)


def load_study(path: str | Path, name: str | None = None, storage: str | None = None):
    """Read and check a study file; returns ``(study, resolved search space)``."""
    study = parse_study_file(path, name=name, storage=storage)
    return study, check_study(study)


def check_study(study: StudyConfig, address: str | None = None) -> dict[str, Dist]:
    """Every check that needs no cluster: search space, metric, leakage warning, and the base run's
    driver checks (data on disk, the model built, a teacher checkpoint read, GPU, compile)."""
    space = resolve_search(study)
    check_metric(study.base, study.tune.metric)
    for i, objective in enumerate(study.tune.objectives or []):
        check_metric(study.base, objective.metric, field=f"tune.objectives.{i}.metric")
    if study.tune.objectives and study.tune.scheduler == "asha":
        raise ConfigError("tune.scheduler", "ASHA stops trials on one metric and cannot weigh several objectives; "
                          "set tune.scheduler: none for a study with tune.objectives")  # fmt: skip
    if study.tune.metric.startswith("test_acc") or study.tune.metric == "best_test_acc":
        print(f"warning: selecting on {study.tune.metric} tunes on the test set; set base.data.val_per_class and "
              "tune.metric: val_acc for an unbiased test figure", file=sys.stderr)  # fmt: skip
    preflight(study.base, address, prefix="base.")
    teacher = study.base.teacher
    if is_uri(study.tune.storage) and teacher is not None and teacher.run is not None:
        raise ConfigError("base.teacher.run", "with a cloud URI as storage, trials on other nodes cannot read a "
                          "teacher trained on this machine; train it first (raykd train) and set "
                          "base.teacher.checkpoint to its run folder on a path every node sees")  # fmt: skip
    if study.tune.repeats > 1 and is_uri(study.tune.storage):
        raise ConfigError("tune.repeats", "seed repeats need tune.storage on a folder every node sees (their trial "
                          "watches its seeds' run folders); a cloud URI is not supported with repeats yet")  # fmt: skip
    return space


def repeat_plan(study: StudyConfig, parallel: int | None) -> RepeatPlan | None:
    """How each trial repeats its configuration (``tune.repeats`` > 1), ``parallel`` seeds at once."""
    t = study.tune
    if t.repeats == 1:
        return None
    return RepeatPlan(tuple(repeat_seeds(study.base, t.repeats)), parallel or 1, t.metric, t.mode, t.aggregate)


def _teachers(study: StudyConfig, plan: RepeatPlan | None, study_dir: Path, address: str | None):
    """The study's teacher (trained once, before any trial), or one per seed with repeats."""
    if plan is None:
        return prepare_teacher(study.base, study_dir, address)
    return prepare_teachers(study.base, list(plan.seeds), study_dir, address)


def study_dir_of(study: StudyConfig) -> Path:
    """The study folder; with a cloud URI as storage, the driver's working copy ``runs/<name>``."""
    storage = study.tune.storage
    return Path("runs" if storage is None or is_uri(storage) else storage) / study.name


def remote_dir_of(study: StudyConfig) -> str | None:
    """``<uri>/<name>`` when the study's storage is a cloud URI, else None."""
    return join(study.tune.storage, study.name) if is_uri(study.tune.storage) else None


def num_evals(cfg: RunConfig) -> int:
    return math.ceil(cfg.train.steps / cfg.train.eval_every)


# --------------------------------------------------------------------------------------------
# the tuner


def build_tuner(
    study: StudyConfig,
    space: dict[str, Dist],
    study_dir: Path,
    max_concurrent: int,
    teacher_dir: Path | dict[int, Path] | None,
    remote: str | None = None,
    plan: RepeatPlan | None = None,
):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raykd.tune.search import RaykdOptunaSearch

    t = study.tune
    searcher = RaykdOptunaSearch(
        space=functools.partial(suggest, space=space), seed=t.seed,
        metric=t.metrics if t.objectives else t.selection, mode=t.modes if t.objectives else t.mode,
        storage=optuna.storages.RDBStorage(f"sqlite:///{(study_dir / OPTUNA_DB).resolve()}"), study_name=study.name,
        study_dir=study_dir, budget_hours=t.budget_hours,
    )  # fmt: skip
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric=t.selection, mode=t.mode, max_t=num_evals(study.base),
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    parallel = plan.parallel if plan else None
    callbacks: list = [ProgressTable(list(study.search), t.selection, t.mode, study.base.train.steps,
                                     spread=t.metric if plan else None), NoTuneEvents(),
                       CostMeter(study_dir, study.base, list(study.search), parallel)]  # fmt: skip
    if remote is not None:
        callbacks.append(TrialMirror(study_dir, remote, study.base, list(study.search)))
    return tune.Tuner(
        make_trainable(study.base, list(study.search), study_dir, teacher_dir=teacher_dir, remote=remote,
                       watched=(study.tune.metric,), repeats=plan),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=remote or str(study_dir.resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=study.base.train.keep_checkpoints),
            callbacks=callbacks,
        ),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# commands


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(raykd.__file__).parent)  # fmt: skip
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _export_header(study: str) -> str:
    return f"# exported by raykd from study {study}, "


def export(study_dir: Path, out: Path, top_k: int = 1, force: bool = False) -> list[Path]:
    """Write the best trial's complete run config to ``out`` (and the next ``top_k - 1`` to
    ``<out stem>_top<N>.yaml``), each with its metrics and provenance.

    Every target is checked before anything is written: a folder is refused, and so is an existing
    file that is not an earlier export of this study (unless ``force``)."""
    if top_k < 1:
        raise ConfigError("--top-k", f"{top_k} exports nothing; use 1 or more")
    study = read_study(study_dir)
    t = study.tune
    ranked = rank_trials(collect_trials(study_dir, list(study.search), study.base.train.steps), t.selection, t.mode)
    if not ranked:
        raise ConfigError(str(study_dir), f"no trial has reported {t.selection} yet; nothing to export")
    targets = [out if rank == 1 else out.with_name(f"{out.stem}_top{rank}{out.suffix}")
               for rank in range(1, min(top_k, len(ranked)) + 1)]  # fmt: skip
    for path in targets:
        if path.is_dir():
            raise ConfigError("--out", f"{path} is a folder; pass a file name, e.g. {path / 'best.yaml'}")
        if path.exists() and not force:
            try:
                ours = path.read_text(encoding="utf-8", errors="replace").startswith(_export_header(study.name))
            except OSError:
                ours = False
            if not ours:
                raise ConfigError("--out", f"{path} exists and is not an export of study {study.name}; choose "
                                  "another --out, or pass --force to replace it")  # fmt: skip
    paths = []
    for rank, (rec, path) in enumerate(zip(ranked[: len(targets)], targets, strict=True), start=1):
        cfg = RunFolder(study_dir / TRIALS_DIR / rec["trial_id"]).config()
        m = rec["metrics"]
        cfg.provenance = {
            "study": study.name, "study_dir": str(study_dir.resolve()), "trial_id": rec["trial_id"], "rank": rank,
            "state": rec["state"], "selected_on": t.selection, "mode": t.mode,
            "metrics": {k: m[k] for k in ("step", t.selection, t.metric, f"{t.metric}_std", "n_seeds", "val_acc",
                                          "test_acc", "test_acc_std", "best_val_acc", "test_acc_at_best_val",
                                          "mask_rate", "pseudo_acc") if k in m},
            "params": rec["params"], "seed": cfg.train.seed, "raykd_version": raykd.__version__,
            "git_commit": _git_commit(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        seeds = rec.get("seeds")
        if seeds is not None:  # every seed's result: the figure above is their aggregate
            cfg.provenance["repeats"] = {"aggregate": t.aggregate, "seeds": [
                {"seed": int(seed), "state": r["state"],
                 **{k: r[k] for k in ("step", t.metric, "val_acc", "test_acc", "test_acc_at_best_val") if k in r}}
                for seed, r in seeds.items()]}  # fmt: skip
        note = (f"; trained with seeds {', '.join(seeds)}: this file is seed {cfg.train.seed}'s run, the metrics "
                "in its provenance are over all of them" if seeds else "")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{_export_header(study.name)}trial {rec['trial_id']} (rank {rank}{note}); "
                        f"re-run with: raykd train {path}\n" + dump_run_config(cfg))  # fmt: skip
        paths.append(path)
    return paths


def export_pareto(study_dir: Path, out: Path, force: bool = False) -> list[Path]:
    """``raykd study export DIR --pareto --out FOLDER``: one complete run config per trial of a
    multi-objective study's Pareto set, as ``FOLDER/<trial_id>.yaml`` with its objectives' values
    and provenance.  Every target is checked first, as :func:`export` does."""
    from raykd.report import pareto_indices

    study = read_study(study_dir)
    objectives = _objectives(study)
    if objectives is None:
        raise ConfigError("--pareto", f"study {study.name} has one objective ({study.tune.metric}); --pareto needs "
                          "tune.objectives. Use --top-k for the best trials")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} is a file; with --pareto, --out is a folder (one YAML per trial)")
    records = collect_trials(study_dir, list(study.search), study.base.train.steps)
    front = [records[i] for i in pareto_indices(records, objectives)]
    if not front:
        raise ConfigError(str(study_dir), "no finished trial reports every objective yet; nothing to export")
    targets = [out / f"{rec['trial_id']}.yaml" for rec in front]
    for path in targets:
        if path.exists() and not force and not path.read_text(encoding="utf-8", errors="replace").startswith(
                _export_header(study.name)):  # fmt: skip
            raise ConfigError("--out", f"{path} exists and is not an export of study {study.name}; choose "
                              "another --out, or pass --force to replace it")  # fmt: skip
    names = [m for m, _ in objectives]
    for rec, path in zip(front, targets, strict=True):
        cfg = RunFolder(study_dir / TRIALS_DIR / rec["trial_id"]).config()
        m = rec["metrics"]
        cfg.provenance = {
            "study": study.name, "study_dir": str(study_dir.resolve()), "trial_id": rec["trial_id"],
            "pareto": True, "objectives": [{"metric": k, "mode": mode} for k, mode in objectives],
            "metrics": {k: m[k] for k in ("step", *names, "val_acc", "test_acc", "test_acc_at_best_val", "params",
                                          "macs", "latency_ms") if k in m},
            "params": rec["params"], "seed": cfg.train.seed, "raykd_version": raykd.__version__,
            "git_commit": _git_commit(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        values = ", ".join(f"{k} {_fmt(m[k])}" for k in names)
        path.write_text(f"{_export_header(study.name)}trial {rec['trial_id']} (Pareto set: {values}); "
                        f"re-run with: raykd train {path}\n" + dump_run_config(cfg))  # fmt: skip
    return targets


def status_text(study_dir: Path) -> str:
    study = read_study(study_dir)
    t = study.tune
    records = collect_trials(study_dir, list(study.search), study.base.train.steps)
    rows = [{"trial_id": r["trial_id"], "state": r["state"], "params": r["params"], "step": r["metrics"].get("step"),
             "metric": r["metrics"].get(t.selection), "cost": r.get("cost"), **_spread(r, t.metric)}
            for r in records]  # fmt: skip
    done = sum(r["state"] == "done" for r in records)
    holder = StudyLock(study_dir).holder()
    running = f"running ({holder})" if holder else "no driver running"
    head = (f"study {study.name}: {len(records)}/{t.num_samples} trials started, {done} finished, {running}; "
            f"best by {t.selection}" + (f" over {t.repeats} seeds per configuration" if t.repeats > 1 else ""))
    if not rows:
        return head + "\n(no trial has started yet)"
    lines = [head, render_table(rows, list(study.search), t.selection, t.mode, study.base.train.steps,
                                t.metric if t.repeats > 1 else None)]  # fmt: skip
    lines.append(spend_line(study_dir, t.budget_hours, held(study.base)[0]))
    if (reached := budget_reached(study_dir, t.budget_hours)) is not None:
        lines.append(f"{reached}: no new trial starts")
    lines += [f"{r['trial_id']} failed: {r['reason']}" for r in records if r.get("reason")]
    if any(r["state"] == "interrupted" for r in records):
        lines.append(f"interrupted trials continue from their latest checkpoint with: {raykd_command()} study resume "
                     f"{study_dir}")  # fmt: skip
    return "\n".join(lines)


def _spread(record: dict, metric: str) -> dict:
    """A repeated trial's ``spread`` for the table: ``(mean, std, n)`` of ``metric`` over the seeds
    that reached its last reported step, and ``seeds_done`` ``(finished, k)``."""
    seeds = record.get("seeds")
    if seeds is None:
        return {}
    m = record["metrics"]
    done = sum(r["state"] == "done" for r in seeds.values())
    return {"spread": (m.get(metric), m.get(f"{metric}_std"), m.get("n_seeds")), "seeds_done": (done, len(seeds))}


def read_study(study_dir: Path) -> StudyConfig:
    """The resolved study config of a study folder."""
    return parse_config(read_yaml(study_dir / STUDY_FILE), StudyConfig)


def write_report(study_dir: Path, records: list[dict] | None = None) -> dict[str, Path]:
    """``raykd report`` on a study folder: study.md, study_trials.csv and the plots; paths by kind."""
    from raykd.report import write_study_report

    study = read_study(study_dir)
    t = study.tune
    if records is None:
        records = collect_trials(study_dir, list(study.search), study.base.train.steps)
    db = study_dir / OPTUNA_DB
    try:
        log_keys = log_scaled(resolve_search(study))
    except ConfigError:  # a folder written by another raykd version: let the values decide
        log_keys = None
    return write_study_report(records, list(study.search), t.selection, t.mode, study_dir,
                              optuna_storage=f"sqlite:///{db.resolve()}" if db.exists() else None,
                              study_name=study.name, log_keys=log_keys, budget_hours=t.budget_hours,
                              objectives=_objectives(study),
                              spread=t.metric if t.repeats > 1 else None)  # fmt: skip


def _objectives(study: StudyConfig) -> list[tuple[str, str]] | None:
    """``(metric, mode)`` of each objective of a multi-objective study, else None."""
    t = study.tune
    return list(zip(t.metrics, t.modes, strict=True)) if t.objectives else None


def _finish(study: StudyConfig, study_dir: Path, wall: float) -> int:
    """The end of ``run`` / ``resume``: report, summary, export.  An experiment that stopped before
    every trial ended (Ctrl-C) exports nothing and returns 130 with the resume command; a study with
    crashed trials returns 1 (after exporting the best finished trial); diverged trials are listed."""
    t = study.tune
    records = collect_trials(study_dir, list(study.search), study.base.train.steps, driver_alive=False)
    ranked = rank_trials(records, t.selection, t.mode)
    try:
        write_report(study_dir, records)
    except Exception as e:  # noqa: BLE001 - a plot must not hide the study's result
        print(f"warning: could not write the study report ({e}); run `raykd report {study_dir}`", file=sys.stderr)
    states = {s: sum(r["state"] == s for r in records)
              for s in ("done", "stopped", "failed", "error", "interrupted")}  # fmt: skip
    print(
        f"\nstudy {study.name}: {len(records)} trials in {wall:.0f} s ("
        + ", ".join(f"{v} {k}" for k, v in states.items() if v)
        + ")"
    )
    for r in records:
        if r.get("reason"):
            print(f"  trial {r['trial_id']} failed: {r['reason']}")
        elif r["state"] == "error":
            print(f"  trial {r['trial_id']} crashed; its error is in {study_dir / TUNE_DIR / r['trial_id']}/error.txt")
    print(spend_line(study_dir, t.budget_hours, held(study.base)[0]))
    budget = budget_reached(study_dir, t.budget_hours) if len(records) < t.num_samples else None
    if budget is not None:  # a study that stopped at its budget has done what it was asked: exit 0
        print(f"{budget}; {len(records)} of {t.num_samples} trials started")
    unfinished = states["interrupted"] or (len(records) < t.num_samples and budget is None)
    if unfinished:
        print(f"interrupted; resume with: {raykd_command()} study resume {study_dir}", file=sys.stderr)
        print(f"(nothing exported: {states['done']} of {t.num_samples} trials finished; `raykd study status "
              f"{study_dir}` shows them)", file=sys.stderr)  # fmt: skip
        return 130
    if not ranked:
        print(f"no trial reported {t.selection}; see {study_dir / TUNE_DIR} for errors", file=sys.stderr)
        return 1
    best = ranked[0]
    m = best["metrics"]
    extra = f" (test_acc {m['test_acc']:.4f})" if "test_acc" in m and t.metric != "test_acc" else ""
    if t.repeats > 1:
        extra = (f" ({t.metric} {format_mean_std(m.get(t.metric), m.get(f'{t.metric}_std'), n=m.get('n_seeds'))}"
                 + (f", test_acc {format_mean_std(m['test_acc'], m.get('test_acc_std'))}" if "test_acc" in m
                    and t.metric != "test_acc" else "") + ")")  # fmt: skip
    print(
        f"best trial {best['trial_id']}: {t.selection} {m[t.selection]:.4f}{extra}; "
        + " ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
    )
    (path,) = export(study_dir, study_dir / "best.yaml")
    print(f"best config: {path}\nre-run it:   {raykd_command()} train {path}\nreport:      {study_dir / 'study.md'}")
    if states["error"]:
        print(f"{states['error']} trial(s) crashed (see above); the best finished trial was exported", file=sys.stderr)
        return 1
    return 0


def run(study: StudyConfig, space: dict[str, Dist], address: str | None = None) -> int:
    """``raykd study run``: start a new study (``space`` from :func:`check_study`).  Ctrl-C stops it
    with exit code 130 and the resume command; nothing is exported from unfinished trials."""
    study_dir, remote = study_dir_of(study), remote_dir_of(study)
    lock = StudyLock(study_dir)
    lock.check_free(f"study {study.name!r}")
    if (study_dir / TUNE_DIR / "tuner.pkl").exists() or (study_dir / STUDY_FILE).exists():
        raise ConfigError("--name", f"study {study.name!r} already exists in {study_dir}: continue it with "
                          f"`raykd study resume {study_dir}`, or pick another --name / --storage")  # fmt: skip
    if remote is not None and uri_exists(join(remote, TUNE_DIR)):
        raise ConfigError("--name", f"study {study.name!r} already exists in {remote}: copy it to {study_dir} and "
                          f"`raykd study resume {study_dir}`, or pick another --name / --storage")  # fmt: skip
    lock.acquire(f"study {study.name!r}")  # from here on a second `study run` / `resume` is refused
    try:
        return _run_locked(study, space, study_dir, remote, address)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: {raykd_command()} study resume {study_dir}", file=sys.stderr)
        return 130
    finally:
        lock.release()


def _start_ray(study: StudyConfig, address: str | None) -> tuple[dict[str, float], list[dict[str, float]], int | None]:
    """Start (or join) Ray for a study: the cluster's resources, its alive nodes, and with seed
    repeats how many seeds of a configuration run at once (a private local Ray is sized for them)."""
    t = study.tune
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    local = local_parallel(study.base, t.repeats) if t.repeats > 1 and not joined else None
    cluster = init_ray_for(study.base, address, local)
    nodes = cluster_nodes()
    parallel = None if t.repeats == 1 else local or cluster_parallel(study.base, t.repeats, nodes)
    return cluster, nodes, parallel


def _run_locked(study: StudyConfig, space: dict[str, Dist], study_dir: Path, remote: str | None,
                address: str | None) -> int:  # fmt: skip
    print("starting Ray…" if not (address or os.environ.get("RAY_ADDRESS")) else f"joining Ray at "
          f"{address or os.environ['RAY_ADDRESS']}…", flush=True)  # fmt: skip
    t = study.tune
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    cluster, nodes, parallel = _start_ray(study, address)
    max_conc = concurrency(study.base, t.num_samples, t.max_concurrent, cluster, nodes, joined, parallel)
    fits_now = trials_that_fit(study.base, nodes, parallel)
    if max_conc > fits_now:
        print(f"note: the cluster fits {fits_now} trial(s) now; up to {max_conc} start as the autoscaler adds nodes",
              flush=True)  # fmt: skip
    if remote is None:
        check_shared(study_dir)  # a multi-node cluster: every node must see the study folder
    _WORKING_COPY[study.name] = study_dir.resolve()
    (study_dir / STUDY_FILE).write_text(yaml.safe_dump(study.model_dump(mode="json", exclude={"base": {"provenance"}}),
                                                       sort_keys=False))  # fmt: skip
    b = study.base
    print(f"raykd study {study.name}: {t.num_samples} trials of {b.method.name} on {b.data.name}, searching "
          f"{', '.join(f'{k} {d.describe()}' for k, d in space.items())}", flush=True)  # fmt: skip
    print(
        f"  optimising {t.selection} ({t.mode}) with Optuna TPE (seed {t.seed}), scheduler {t.scheduler}; "
        f"{max_conc} trial(s) at a time, each {b.scaling.num_workers} worker(s) "
        f"({'inline' if b.scaling.num_workers == 1 else 'Train-in-Tune, DDP'}); folder {study_dir}"
        + (f" (copied to {remote}; Ray's experiment and checkpoints are written there)" if remote else ""),
        flush=True,
    )
    plan = repeat_plan(study, parallel)
    if plan is not None:
        print(f"  each configuration is trained with {t.repeats} seeds ({', '.join(map(str, plan.seeds))}; each sets "
              f"train.seed and data.seed), {plan.parallel} at a time; the searcher and the scheduler see "
              f"{t.selection} over the seeds", flush=True)  # fmt: skip
    started = time.time()
    teacher_dir = _teachers(study, plan, study_dir, address)
    print(f"waiting for the first {min(max_conc, t.num_samples)} trial(s) to start…", flush=True)
    build_tuner(study, space, study_dir, max_conc, teacher_dir, remote, plan).fit()
    return _finish_and_sync(study, study_dir, remote, time.time() - started)


def _finish_and_sync(study: StudyConfig, study_dir: Path, remote: str | None, wall: float) -> int:
    rc = _finish(study, study_dir, wall)
    if remote is not None:
        try:
            upload(study_dir, remote)  # best.yaml and the report too
            print(f"copied {study_dir} to {remote}", flush=True)
        except Exception as e:  # noqa: BLE001 - the study itself is done and in the working copy
            print(f"warning: could not copy {study_dir} to {remote} ({e}); copy it yourself", file=sys.stderr)
    return rc


#: what ``Tuner.restore`` unpickles from a study folder's ``tune/``: the pickles (also the trials'
#: params.pkl / error.pkl) and the experiment and search-generator states, JSON that embeds
#: cloudpickle payloads which Tune decodes on restore (running their code is what a resume trusts)
PICKLES = ("**/*.pkl", "experiment_state-*.json", "search_gen_state-*.json")


def check_trusted(study_dir: Path) -> None:
    """Refuse to unpickle Ray's state from a folder that someone else could have written.

    ``raykd study resume`` hands ``tune/`` to ``Tuner.restore``, which unpickles ``tuner.pkl``, the
    searcher state and every trial's pickles, and decodes the cloudpickle payloads inside the
    experiment state: whoever can write those files can run code as the user who resumes.  Each of
    them, and ``tune/`` and every folder holding one (where a file could be swapped), must belong to
    this user and be writable by nobody else (as raykd writes them)."""
    tune_dir = study_dir / TUNE_DIR
    found = {p for pattern in PICKLES for p in tune_dir.glob(pattern)}
    for path in sorted({tune_dir, *(p.parent for p in found)}) + sorted(found):
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            who = "belongs to another user" if st.st_uid != os.getuid() else "is writable by group or others"
            raise ConfigError(str(path), f"{who}; resuming unpickles what it holds, which runs whatever it holds. If "
                              f"you trust it, make it yours and private (chown, chmod go-w {path}), or start a new "
                              "study")  # fmt: skip


def resume(study_dir: Path, address: str | None = None) -> int:
    """``raykd study resume``: finish an interrupted study; finished trials are kept, not re-run.

    Every check runs before Ray starts: the study folder, its lock (one driver at a time), the Tune
    experiment and the Optuna database it continues, and that the pickles it unpickles are the
    user's own."""
    from ray import tune

    if not (study_dir / STUDY_FILE).exists():
        raise ConfigError(str(study_dir), f"not a study folder (no {STUDY_FILE}); pass the folder `raykd study run` "
                          "created, e.g. runs/<name>")  # fmt: skip
    study = read_study(study_dir)
    space = check_study(study, address)
    remote = remote_dir_of(study)
    lock = StudyLock(study_dir)
    lock.check_free(f"study {study.name!r}")
    tune_dir = join(remote, TUNE_DIR) if remote else str((study_dir / TUNE_DIR).resolve())
    if not tune.Tuner.can_restore(tune_dir):
        raise ConfigError(str(study_dir), f"its Ray Tune experiment is missing ({tune_dir}/tuner.pkl), so its trials "
                          "cannot be continued; the finished ones stay readable (`raykd study status` / `export`). "
                          "Start a new study from the same file with another name: `raykd study run FILE --name "
                          f"{study.name}-2`")  # fmt: skip
    records = collect_trials(study_dir, list(study.search), study.base.train.steps, driver_alive=False)
    ended = [r for r in records if r["state"] in ("done", "stopped", "failed")]
    db = study_dir / OPTUNA_DB
    if remote is None and not db.exists():
        if len(ended) >= study.tune.num_samples:
            from raykd.tune.search import rebuild_optuna

            rebuild_optuna(f"sqlite:///{db.resolve()}", study.name, study.tune.selection, study.tune.mode, space,
                           records)  # fmt: skip
            print(f"study {study.name} had finished; {OPTUNA_DB} was missing and is rebuilt from its {len(records)} "
                  f"trial folders: {db}", flush=True)  # fmt: skip
            return 0
        raise ConfigError(str(db), "is missing, and the study is not finished: Optuna's search history cannot be "
                          "restored, so the search would not continue where it stopped. Put the file back, or "
                          f"start a new study (`raykd study run FILE --name {study.name}-2`); the finished trials "
                          "stay readable with `raykd study status` / `export`")  # fmt: skip
    if remote is None:
        check_trusted(study_dir)
    lock.acquire(f"study {study.name!r}")
    try:
        return _resume_locked(study, study_dir, remote, tune_dir, address, records)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: {raykd_command()} study resume {study_dir}", file=sys.stderr)
        return 130
    finally:
        lock.release()


def _resume_locked(study: StudyConfig, study_dir: Path, remote: str | None, tune_dir: str, address: str | None,
                   records: list[dict]) -> int:  # fmt: skip
    from ray import tune

    print("starting Ray…" if not (address or os.environ.get("RAY_ADDRESS")) else "joining Ray…", flush=True)
    _, _, parallel = _start_ray(study, address)
    plan = repeat_plan(study, parallel)
    if remote is None:
        check_shared(study_dir)
    _WORKING_COPY[study.name] = study_dir.resolve()
    done = [r["trial_id"] for r in records if r["state"] == "done"]
    print(f"resuming study {study.name} in {study_dir}: {len(done)} finished trial(s) kept", flush=True)
    started = time.time()
    if plan is not None:
        seeds_done = sum(r["state"] == "done" for rec in records for r in (rec.get("seeds") or {}).values())
        print(f"  {seeds_done} finished seed run(s) kept; the others continue from their latest checkpoint",
              flush=True)  # fmt: skip
    teacher_dir = _teachers(study, plan, study_dir, address)  # cached: found, not retrained
    trainable = make_trainable(study.base, list(study.search), study_dir, teacher_dir=teacher_dir, remote=remote,
                               watched=(study.tune.metric,), repeats=plan)  # fmt: skip
    tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                               resume_errored=True)  # fmt: skip
    tuner.fit()
    return _finish_and_sync(study, study_dir, remote, time.time() - started)
