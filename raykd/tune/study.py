"""Studies: Ray Tune + Optuna search over a base run config; status, resume and export.

A study named N lands in ``<storage>/N/`` (default ``runs/N/``)::

    study.yaml            the resolved study config (base with defaults merged)
    optuna.db             the Optuna study (sqlite; ``optuna-dashboard sqlite:///.../optuna.db``)
    tune/                 the Ray Tune experiment (tuner.pkl, experiment state, per-trial Tune logs
                          with TensorBoard event files, inline trials' checkpoints)
    trials/<trial_id>/    one run folder per trial: config.yaml, progress.jsonl, result.json
    best.yaml             the best trial's complete run config (+ metrics and provenance)
    study.md, study_trials.csv, *.png   tables and plots (``raykd report``)

``--storage`` may be a shared folder or a cloud URI (raykd/tune/storage.py, docs/cluster.md): with a
URI, Ray writes ``tune/`` and the checkpoints to ``<uri>/N/``, the driver keeps the rest in its working
copy ``runs/N/`` (trial folders rebuilt from Tune's results) and copies it to ``<uri>/N/``.

Selection uses ``tune.metric`` (default ``val_acc``, the held-out validation split) and reports test
accuracy separately; see docs/studies.md.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

import raykd
from raykd.config import RunConfig, StudyConfig, dump_run_config, parse_config, parse_run_config, read_yaml
from raykd.data import data_of
from raykd.errors import ConfigError, raykd_command
from raykd.train.teacher import prepare_teacher
from raykd.tune.space import Dist, check_metric, resolve_search, short_names, suggest, with_params
from raykd.tune.storage import check_shared, is_uri, join, node_local_root, upload, uri_exists
from raykd.tune.trial import TRIALS_DIR, run_trial, trial_needs, trial_resources, trials_that_fit

STUDY_FILE = "study.yaml"
TUNE_DIR = "tune"
OPTUNA_DB = "optuna.db"


# --------------------------------------------------------------------------------------------
# loading and checks (all before Ray starts)


def load_study(path: str | Path, name: str | None = None, storage: str | None = None):
    """Read and check a study file; returns ``(study, resolved search space)``."""
    raw = read_yaml(path)
    if name is not None:
        raw["name"] = name
    if storage is not None:
        raw.setdefault("tune", {})["storage"] = storage
    study = parse_config(raw, StudyConfig)
    return study, check_study(study)


def check_study(study: StudyConfig) -> dict[str, Dist]:
    """Every check that needs no cluster: search space, metric, leakage warning, data on disk."""
    space = resolve_search(study)
    check_metric(study.base, study.tune.metric)
    if study.tune.metric.startswith("test_acc") or study.tune.metric == "best_test_acc":
        print(f"warning: selecting on {study.tune.metric} tunes on the test set; set base.data.val_per_class and "
              "tune.metric: val_acc for an unbiased test figure", file=sys.stderr)  # fmt: skip
    data_of(study.base)
    teacher = study.base.teacher
    if is_uri(study.tune.storage) and teacher is not None and teacher.run is not None:
        raise ConfigError("base.teacher.run", "with a cloud URI as storage, trials on other nodes cannot read a "
                          "teacher trained on this machine; train it first (raykd train) and set "
                          "base.teacher.checkpoint to its run folder on a path every node sees")  # fmt: skip
    return space


def study_dir_of(study: StudyConfig) -> Path:
    """The study folder; with a cloud URI as storage, the driver's working copy ``runs/<name>``."""
    storage = study.tune.storage
    return Path("runs" if storage is None or is_uri(storage) else storage) / study.name


def remote_dir_of(study: StudyConfig) -> str | None:
    """``<uri>/<name>`` when the study's storage is a cloud URI, else None."""
    return join(study.tune.storage, study.name) if is_uri(study.tune.storage) else None


def num_evals(cfg: RunConfig) -> int:
    return math.ceil(cfg.train.steps / cfg.train.eval_every)


def concurrency(
    base: RunConfig,
    num_trials: int,
    cap: int | None,
    cluster: dict[str, float],
    nodes: list[dict[str, float]] | None = None,
    joined: bool = False,
) -> int:
    """How many trials run at once: what the nodes fit (:func:`~raykd.tune.trial.trials_that_fit`), capped
    by ``cap`` and the trial count.

    Tune counts only each trial's own process; a Train-in-Tune trial's workers reserve their own
    placement group, so raykd computes the fit from everything a trial holds.  ``nodes``: each alive
    node's resources (default: the cluster's totals as one node).  ``joined`` (an existing cluster,
    which may autoscale): an explicit ``cap`` is kept even above what fits now, so that the waiting
    trials make the autoscaler add nodes.
    """
    fits = trials_that_fit(base, nodes if nodes is not None else [cluster])
    if joined and cap:
        return min(cap, num_trials)
    if fits < 1:
        need = trial_needs(base)
        have = {k: cluster.get(k, 0.0) for k in need}
        hint = "; on an autoscaling cluster set tune.max_concurrent, and trials wait for new nodes" if joined else ""
        raise ConfigError("base.scaling", f"one trial needs {need} but the cluster has {have}; lower "
                          "scaling.num_workers / cpus_per_worker / gpus_per_worker or add nodes" + hint)  # fmt: skip
    n = min(fits, num_trials)
    return min(n, cap) if cap else n


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def init_ray_for(study_base: RunConfig, address: str | None) -> dict[str, float]:
    """Start (or join) Ray for a study; returns the cluster's resources.

    The dashboard stays on when trials use Train-in-Tune: without it an ASHA-stopped trial leaks its
    Train placement group and the study hangs (../shared/RAY.md).  Inline trials need no State API.
    """
    from raykd.train.trainer import init_ray

    train_in_tune = study_base.scaling.num_workers > 1
    init_ray(trial_needs(study_base)["CPU"], address, include_dashboard=train_in_tune)
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


# --------------------------------------------------------------------------------------------
# the trainable and the tuner


def make_trainable(
    base: RunConfig,
    keys: list[str],
    study_dir: Path,
    seed_keys: tuple[str, ...] = (),
    teacher_dir: Path | dict[int, Path] | None = None,
    remote: str | None = None,
):
    """The Tune trainable of a study (``keys`` = the searched knobs) or an ablation (the grid knobs;
    the trial's ``seed`` param goes to every key of ``seed_keys``), with the trial's resources.  The
    teacher, if any, was trained by the driver beforehand (``teacher_dir``, or one per seed); trials
    only load it.  With ``remote`` (cloud storage ``<uri>/<name>``) a trial writes its run folder in a
    scratch folder of its node and its Train checkpoints to ``<remote>/trials/<id>``."""
    from ray import tune

    root, raw, name = str(study_dir.resolve()), base.model_dump(mode="json"), study_dir.name
    if isinstance(teacher_dir, dict):
        teachers = {seed: str(d) for seed, d in teacher_dir.items()}
    else:
        teachers = {None: str(teacher_dir) if teacher_dir else None}

    def raykd_trial(config: dict[str, Any]) -> None:
        params = {k: config[k] for k in keys}
        params.update({k: config["seed"] for k in seed_keys})
        trial_id = tune.get_context().get_trial_id()
        teacher = teachers.get(config.get("seed"), teachers.get(None))
        if remote is None:
            run_trial(with_params(raw, params), Path(root) / TRIALS_DIR / trial_id, teacher_dir=teacher)
        else:  # the driver rebuilds the trial folder from Tune's results; this node's copy is scratch
            scratch = node_local_root(name) / TRIALS_DIR / trial_id
            run_trial(with_params(raw, params), scratch, teacher_dir=teacher,
                      train_storage=join(remote, TRIALS_DIR, trial_id))  # fmt: skip
            shutil.rmtree(scratch, ignore_errors=True)

    return tune.with_resources(raykd_trial, trial_resources(base))


def build_tuner(
    study: StudyConfig,
    space: dict[str, Dist],
    study_dir: Path,
    max_concurrent: int,
    teacher_dir: Path | None,
    remote: str | None = None,
):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    t = study.tune
    searcher = OptunaSearch(
        space=functools.partial(suggest, space=space), metric=t.metric, mode=t.mode, seed=t.seed,
        storage=optuna.storages.RDBStorage(f"sqlite:///{(study_dir / OPTUNA_DB).resolve()}"), study_name=study.name,
    )  # fmt: skip
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric=t.metric, mode=t.mode, max_t=num_evals(study.base),
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    callbacks = [ProgressTable(list(study.search), t.metric, t.mode, study.base.train.steps)]
    if remote is not None:
        callbacks.append(TrialMirror(study_dir, remote, study.base, list(study.search)))
    return tune.Tuner(
        make_trainable(study.base, list(study.search), study_dir, teacher_dir=teacher_dir, remote=remote),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=remote or str(study_dir.resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=study.base.train.keep_checkpoints),
            callbacks=callbacks,
        ),
    )  # fmt: skip


def _trial_dirname(trial) -> str:
    return trial.trial_id


# --------------------------------------------------------------------------------------------
# live progress


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_table(rows: list[dict[str, Any]], keys: list[str], metric: str, mode: str, steps: int) -> str:
    """A compact table: trial, state, the searched knobs (short names), step, metric; best marked ``*``."""
    names = short_names(keys)
    scored = [r for r in rows if isinstance(r.get("metric"), (int, float)) and not math.isnan(r["metric"])]
    best = (max if mode == "max" else min)(scored, key=lambda r: r["metric"]) if scored else None
    header = ["", "trial", "state", *names.values(), "step", metric]
    body = []
    for r in rows:
        step = r.get("step")
        body.append(["*" if r is best else "", r["trial_id"], r["state"], *(_fmt(r["params"].get(k, "")) for k in keys),
                     f"{step}/{steps}" if step is not None else "-",
                     f"{r['metric']:.4f}" if r in scored else "-"])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    return "\n".join(lines)


class ProgressTable(Callback):
    """Tune callback printing one line per trial event and a compact table every ``every_s`` seconds."""

    def __init__(self, keys: list[str], metric: str, mode: str, steps: int, every_s: float = 20.0):
        self.keys, self.metric, self.mode, self.steps, self.every_s = keys, metric, mode, steps, every_s
        self._rows: dict[str, dict[str, Any]] = {}
        self._last_print = 0.0
        self._dirty = False

    def _row(self, trial) -> dict[str, Any]:
        row = self._rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "state": "PENDING", "params": {},
                                                     "step": None, "metric": None})  # fmt: skip
        row["params"] = {k: trial.config.get(k) for k in self.keys}
        return row

    def _print_table(self, force: bool = False) -> None:
        if not self._rows or not (force or (self._dirty and time.time() - self._last_print >= self.every_s)):
            return
        print(render_table(list(self._rows.values()), self.keys, self.metric, self.mode, self.steps), flush=True)
        self._last_print, self._dirty = time.time(), False

    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "RUNNING"
        knobs = " ".join(f"{n}={_fmt(row['params'][k])}" for k, n in short_names(self.keys).items())
        print(f"trial {trial.trial_id} started: {knobs}", flush=True)
        self._dirty = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["step"], row["metric"] = result.get("step"), result.get(self.metric)
        self._dirty = True
        self._print_table()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "done" if row.get("step") == self.steps else "stopped"
        what = "finished" if row["state"] == "done" else f"stopped early by the scheduler at step {row.get('step')}"
        value = f"{row['metric']:.4f}" if isinstance(row.get("metric"), float) else "-"
        print(f"trial {trial.trial_id} {what}: {self.metric} {value}", flush=True)
        self._dirty = True
        self._print_table()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "ERROR"
        print(f"trial {trial.trial_id} failed; its error is in {trial.local_path}/error.txt", flush=True)
        self._dirty = True

    def on_experiment_end(self, trials, **info):
        self._print_table(force=True)


# --------------------------------------------------------------------------------------------
# cloud storage: the driver's working copy of the trial folders


#: study name -> working copy, set by the driver that runs or resumes it (a restored tuner's mirror
#: was pickled with the folder of the machine that started the study)
_WORKING_COPY: dict[str, Path] = {}
#: trial id -> Tune status, kept by the mirror (the Tune experiment state is in the bucket)
MIRRORED_STATES = "trial_states.json"
#: Tune's own result keys, left out of the rebuilt progress lines
_TUNE_KEYS = {"trial_id", "done", "experiment_tag", "checkpoint_path", "should_checkpoint", "training_iteration"}


class TrialMirror(Callback):
    """Cloud storage: trials run on any node and write their run folders there, so the driver rebuilds
    each trial folder (``config.yaml``, ``progress.jsonl``, ``result.json``) in its working copy from
    the results Tune hands it, and copies the working copy to ``remote`` after every finished trial
    and at the end of the experiment."""

    def __init__(self, study_dir: Path, remote: str, base: RunConfig, keys: list[str]):
        self.study_dir, self.remote, self.keys = study_dir.resolve(), remote, keys
        self.raw, self.steps = base.model_dump(mode="json"), base.train.steps
        self._last_step: dict[str, int] = {}

    def _root(self) -> Path:
        return _WORKING_COPY.get(self.study_dir.name, self.study_dir)

    def _dir(self, trial) -> Path:
        d = self._root() / TRIALS_DIR / trial.trial_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _set_state(self, trial, status: str) -> None:
        path = self._root() / MIRRORED_STATES
        try:
            states = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            states = {}
        states[trial.trial_id] = status
        path.with_suffix(".tmp").write_text(json.dumps(states, indent=1))
        path.with_suffix(".tmp").replace(path)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._set_state(trial, "RUNNING")
        d = self._dir(trial)
        if not (d / "config.yaml").exists():
            params = {k: trial.config[k] for k in self.keys}
            (d / "config.yaml").write_text(dump_run_config(with_params(self.raw, params)))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from ray.tune.result import AUTO_RESULT_KEYS

        from raykd.train.context import append_progress, write_result

        d = self._dir(trial)
        step = result.get("step")
        if trial.trial_id not in self._last_step and (d / "progress.jsonl").exists():
            lines = (d / "progress.jsonl").read_text().splitlines()
            self._last_step[trial.trial_id] = json.loads(lines[-1]).get("step", -1) if lines else -1
        if not isinstance(step, int) or step <= self._last_step.get(trial.trial_id, -1):
            return  # a restarted trial re-reporting a step already recorded
        self._last_step[trial.trial_id] = step
        skip = set(AUTO_RESULT_KEYS) | _TUNE_KEYS
        record = {k: v for k, v in result.items() if k not in skip and isinstance(v, (int, float, str, bool))}
        append_progress(d, record)
        if step == self.steps:
            write_result(d, record)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._set_state(trial, "TERMINATED")
        self.sync()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._set_state(trial, "ERROR")
        self.sync()

    def on_experiment_end(self, trials, **info):
        self.sync()

    def sync(self) -> None:
        try:
            upload(_WORKING_COPY.get(self.study_dir.name, self.study_dir), self.remote)
        except Exception as e:  # noqa: BLE001 - the next sync retries; a study must not die of a failed copy
            print(f"warning: could not copy the study folder to {self.remote} ({e})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# reading a study folder (works while it runs and after)


def _dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


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


def collect_trials(study_dir: Path, keys: list[str], steps: int) -> list[dict[str, Any]]:
    """Trial records (trial_id, state, params, metrics, history) from the trial folders, oldest first.

    state: ``done`` (reached train.steps), ``stopped`` (ended early by the scheduler), ``running``,
    ``error``, or ``interrupted`` (the driver died while it ran; ``raykd study resume`` continues it).
    """
    tune_states = _tune_states(study_dir)
    folders = sorted((study_dir / TRIALS_DIR).glob("*/config.yaml"), key=lambda p: p.stat().st_mtime)
    records = []
    for cfg_path in folders:
        d = cfg_path.parent
        cfg = yaml.safe_load(cfg_path.read_text())
        history = []
        if (d / "progress.jsonl").exists():
            history = [json.loads(x) for x in (d / "progress.jsonl").read_text().splitlines() if x.strip()]
        tune_state = tune_states.get(d.name, "")
        if (d / "result.json").exists():
            metrics, state = json.loads((d / "result.json").read_text()), "done"
        else:
            metrics = history[-1] if history else {}
            state = {"RUNNING": "running", "ERROR": "error", "TERMINATED": "stopped", "PENDING": "pending",
                     "PAUSED": "paused"}.get(tune_state, "interrupted")  # fmt: skip
        records.append({"trial_id": d.name, "state": state, "params": {k: _dotted(cfg, k) for k in keys},
                        "metrics": metrics, "history": history})  # fmt: skip
    return records


def rank_trials(records: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Trials best first by ``metric``.  Trials that ran the full budget come before early-stopped
    ones, so the exported config reproduces when re-run with its own budget."""
    scored = [r for r in records if isinstance(r["metrics"].get(metric), (int, float))]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(scored, key=lambda r: (r["state"] != "done", sign * r["metrics"][metric]))


# --------------------------------------------------------------------------------------------
# commands


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(raykd.__file__).parent)  # fmt: skip
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def export(study_dir: Path, out: Path, top_k: int = 1) -> list[Path]:
    """Write the best trial's complete run config to ``out`` (and the next ``top_k - 1`` to
    ``<out stem>_top<N>.yaml``), each with its metrics and provenance."""
    study = parse_config(read_yaml(study_dir / STUDY_FILE), StudyConfig)
    t = study.tune
    ranked = rank_trials(collect_trials(study_dir, list(study.search), study.base.train.steps), t.metric, t.mode)
    if not ranked:
        raise ConfigError(str(study_dir), f"no trial has reported {t.metric} yet; nothing to export")
    paths = []
    for rank, rec in enumerate(ranked[:top_k], start=1):
        cfg = parse_run_config(yaml.safe_load((study_dir / TRIALS_DIR / rec["trial_id"] / "config.yaml").read_text()))
        m = rec["metrics"]
        cfg.provenance = {
            "study": study.name, "study_dir": str(study_dir.resolve()), "trial_id": rec["trial_id"], "rank": rank,
            "state": rec["state"], "selected_on": t.metric, "mode": t.mode,
            "metrics": {k: m[k] for k in ("step", t.metric, "val_acc", "test_acc", "best_val_acc",
                                          "test_acc_at_best_val", "mask_rate", "pseudo_acc") if k in m},
            "params": rec["params"], "seed": cfg.train.seed, "raykd_version": raykd.__version__,
            "git_commit": _git_commit(), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        path = out if rank == 1 else out.with_name(f"{out.stem}_top{rank}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# exported by raykd from study {study.name}, trial {rec['trial_id']} (rank {rank}); "
                        f"re-run with: raykd train {path}\n" + dump_run_config(cfg))  # fmt: skip
        paths.append(path)
    return paths


def status_text(study_dir: Path) -> str:
    study = parse_config(read_yaml(study_dir / STUDY_FILE), StudyConfig)
    t = study.tune
    records = collect_trials(study_dir, list(study.search), study.base.train.steps)
    rows = [{"trial_id": r["trial_id"], "state": r["state"], "params": r["params"], "step": r["metrics"].get("step"),
             "metric": r["metrics"].get(t.metric)} for r in records]  # fmt: skip
    done = sum(r["state"] == "done" for r in records)
    head = f"study {study.name}: {len(records)}/{t.num_samples} trials started, {done} finished; best by {t.metric}"
    if not rows:
        return head + "\n(no trial has started yet)"
    return head + "\n" + render_table(rows, list(study.search), t.metric, t.mode, study.base.train.steps)


def _finish(study: StudyConfig, study_dir: Path, wall: float) -> int:
    from raykd.report import write_study_report

    t = study.tune
    records = collect_trials(study_dir, list(study.search), study.base.train.steps)
    ranked = rank_trials(records, t.metric, t.mode)
    try:
        write_study_report(
            records,
            list(study.search),
            t.metric,
            t.mode,
            study_dir,
            optuna_storage=f"sqlite:///{(study_dir / OPTUNA_DB).resolve()}",
            study_name=study.name,
        )
    except Exception as e:  # noqa: BLE001 - a plot must not hide the study's result
        print(f"warning: could not write the study report ({e}); run `raykd report {study_dir}`", file=sys.stderr)
    states = {s: sum(r["state"] == s for r in records) for s in ("done", "stopped", "error", "interrupted")}
    print(
        f"\nstudy {study.name}: {len(records)} trials in {wall:.0f} s ("
        + ", ".join(f"{v} {k}" for k, v in states.items() if v)
        + ")"
    )
    if not ranked:
        print(f"no trial reported {t.metric}; see {study_dir / TUNE_DIR} for errors", file=sys.stderr)
        return 1
    best = ranked[0]
    m = best["metrics"]
    extra = f" (test_acc {m['test_acc']:.4f})" if "test_acc" in m and t.metric != "test_acc" else ""
    print(
        f"best trial {best['trial_id']}: {t.metric} {m[t.metric]:.4f}{extra}; "
        + " ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
    )
    (path,) = export(study_dir, study_dir / "best.yaml")
    print(f"best config: {path}\nre-run it:   {raykd_command()} train {path}\nreport:      {study_dir / 'study.md'}")
    return 0


def run(study: StudyConfig, space: dict[str, Dist], address: str | None = None) -> int:
    """``raykd study run``: start a new study (``space`` from :func:`check_study`)."""
    study_dir, remote = study_dir_of(study), remote_dir_of(study)
    if (study_dir / TUNE_DIR / "tuner.pkl").exists() or (study_dir / STUDY_FILE).exists():
        raise ConfigError("--name", f"study {study.name!r} already exists in {study_dir}: continue it with "
                          f"`raykd study resume {study_dir}`, or pick another --name / --storage")  # fmt: skip
    if remote is not None and uri_exists(join(remote, TUNE_DIR)):
        raise ConfigError("--name", f"study {study.name!r} already exists in {remote}: copy it to {study_dir} and "
                          f"`raykd study resume {study_dir}`, or pick another --name / --storage")  # fmt: skip
    cluster = init_ray_for(study.base, address)
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    nodes = cluster_nodes()
    max_conc = concurrency(study.base, study.tune.num_samples, study.tune.max_concurrent, cluster, nodes, joined)
    fits_now = trials_that_fit(study.base, nodes)
    if max_conc > fits_now:
        print(f"note: the cluster fits {fits_now} trial(s) now; up to {max_conc} start as the autoscaler adds nodes",
              flush=True)  # fmt: skip
    study_dir.mkdir(parents=True, exist_ok=True)
    if remote is None:
        check_shared(study_dir)  # a multi-node cluster: every node must see the study folder
    _WORKING_COPY[study.name] = study_dir.resolve()
    (study_dir / STUDY_FILE).write_text(yaml.safe_dump(study.model_dump(mode="json", exclude={"base": {"provenance"}}),
                                                       sort_keys=False))  # fmt: skip
    b, t = study.base, study.tune
    print(f"raykd study {study.name}: {t.num_samples} trials of {b.method.name} on {b.data.name}, searching "
          f"{', '.join(f'{k} {d.describe()}' for k, d in space.items())}", flush=True)  # fmt: skip
    print(
        f"  optimising {t.metric} ({t.mode}) with Optuna TPE (seed {t.seed}), scheduler {t.scheduler}; "
        f"{max_conc} trial(s) at a time, each {b.scaling.num_workers} worker(s) "
        f"({'inline' if b.scaling.num_workers == 1 else 'Train-in-Tune, DDP'}); folder {study_dir}"
        + (f" (copied to {remote}; Ray's experiment and checkpoints are written there)" if remote else ""),
        flush=True,
    )
    started = time.time()
    teacher_dir = prepare_teacher(study.base, study_dir, address)
    build_tuner(study, space, study_dir, max_conc, teacher_dir, remote).fit()
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


def resume(study_dir: Path, address: str | None = None) -> int:
    """``raykd study resume``: finish an interrupted study; finished trials are kept, not re-run."""
    from ray import tune

    if not (study_dir / STUDY_FILE).exists():
        raise ConfigError(str(study_dir), f"not a study folder (no {STUDY_FILE}); pass the folder `raykd study run` "
                          "created, e.g. runs/<name>")  # fmt: skip
    study = parse_config(read_yaml(study_dir / STUDY_FILE), StudyConfig)
    check_study(study)
    remote = remote_dir_of(study)
    tune_dir = join(remote, TUNE_DIR) if remote else str((study_dir / TUNE_DIR).resolve())
    init_ray_for(study.base, address)
    if remote is None:
        check_shared(study_dir)
    _WORKING_COPY[study.name] = study_dir.resolve()
    if not tune.Tuner.can_restore(tune_dir):
        raise ConfigError(str(study_dir), f"the Tune experiment was never saved ({tune_dir}/tuner.pkl missing); start "
                          "it again with `raykd study run`")  # fmt: skip
    done = [r["trial_id"] for r in collect_trials(study_dir, list(study.search), study.base.train.steps)
            if r["state"] == "done"]  # fmt: skip
    print(f"resuming study {study.name} in {study_dir}: {len(done)} finished trial(s) kept", flush=True)
    started = time.time()
    teacher_dir = prepare_teacher(study.base, study_dir, address)  # cached: found, not retrained
    trainable = make_trainable(study.base, list(study.search), study_dir, teacher_dir=teacher_dir, remote=remote)
    tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                               resume_errored=True)  # fmt: skip
    tuner.fit()
    return _finish_and_sync(study, study_dir, remote, time.time() - started)
