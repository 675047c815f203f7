"""One study trial = one Ray Tune function trainable running one raykd run.

* ``scaling.num_workers == 1``: the loop runs **inline** in the trial process (a Tune session:
  ``tune.report`` with Tune checkpoints, ``tune.get_checkpoint()`` on restart).  A TorchTrainer per
  trial would cost 15–19 s and ~1.9 GB before the first step, which a study of small trials must not
  pay.
* ``scaling.num_workers > 1``: the trial builds and fits one ``TorchTrainer`` (Train-in-Tune) whose
  workers run the same loop; ``TuneReportCallback`` forwards rank 0's (all-reduced) metrics, and the
  Train run is named ``train`` under the trial's own folder, so a restarted trial resumes its own
  checkpoint.

Each trial's folder ``<study>/trials/<trial_id>/`` is a run folder like ``raykd train``'s:
``config.yaml``, ``progress.jsonl``, ``result.json`` once finished (and ``train/checkpoint_*`` for
Train-in-Tune trials; inline trials' checkpoints are Tune's, under ``<study>/tune/<trial_id>/``).
A trial whose ``result.json`` exists is never trained again: it re-reports its result and returns.
``result.json`` also records ``node_id``, the Ray node that ran rank 0 (inline: the trial process).

With seed repeats (``tune.repeats``), a trial instead runs its configuration once per seed as Ray
tasks and reports their aggregate (:mod:`raykd.tune.repeats`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.config import RunConfig
from raykd.train.runfolder import RunFolder
from raykd.train.trainer import raise_if_diverged
from raykd.tune.records import TRIALS_DIR
from raykd.tune.repeats import RepeatedTrial, RepeatPlan
from raykd.tune.resources import trial_resources
from raykd.tune.space import with_params
from raykd.tune.storage import join, node_local_root


class TuneInlineSession:
    """The loop's session inside a Tune function trainable (one worker, in the trial process)."""

    rank = 0
    world_size = 1

    def __init__(self, use_gpu: bool, run_dir: Path | None = None) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.run_dir = run_dir

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        from raykd.train.trainer import with_node_id

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(with_node_id(metrics, self.run_dir), checkpoint=ckpt)

    def latest_checkpoint(self) -> Path | None:
        from ray import tune

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        local = Path(ckpt.path)  # on local or shared storage: the folder itself (its siblings are the fallbacks)
        return local if local.is_dir() else Path(ckpt.to_directory())

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)


def run_trial(
    cfg: RunConfig,
    run_dir: Path,
    teacher_dir: str | None = None,
    train_storage: str | None = None,
    watched: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train ``cfg`` as the current Tune trial, in ``run_dir``; returns the final metrics.

    ``train_storage``: where a Train-in-Tune trial keeps its Train checkpoints (a URI with cloud
    storage; default ``run_dir``)."""
    from ray import tune

    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir)
    metrics = folder.result()
    if metrics is not None:  # finished before the driver was interrupted: keep it, never re-run
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        return metrics
    raise_if_diverged(folder)  # a diverged trial retried by Tune fails again at once
    folder.write_config(cfg)
    if cfg.scaling.num_workers == 1:
        from raykd.train.loop import train_loop

        metrics = train_loop(cfg, TuneInlineSession(cfg.scaling.use_gpu, run_dir), run_dir, teacher_dir=teacher_dir,
                             watched=watched)  # fmt: skip
    else:
        metrics = _fit_train_in_tune(cfg, run_dir, teacher_dir, train_storage, watched)
    raise_if_diverged(folder)  # Tune marks the trial ERROR, Optuna FAIL
    return metrics  # result.json was written by the loop at the last step


def _fit_train_in_tune(
    cfg: RunConfig, run_dir: Path, teacher_dir: str | None, train_storage: str | None = None,
    watched: tuple[str, ...] = (),
) -> dict[str, Any]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.train.trainer import build_trainer

    # the Train run is named per trial folder: a restarted trial resumes its own snapshot
    trainer = build_trainer(cfg, run_dir, teacher_dir, callbacks=[TuneReportCallback()], controller_failure_limit=3,
                            storage_path=train_storage, watched=watched)  # fmt: skip
    result = trainer.fit()
    return {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_") and k != "checkpoint_path"}


def make_trainable(
    base: RunConfig,
    keys: list[str],
    study_dir: Path,
    seed_keys: tuple[str, ...] = (),
    teacher_dir: Path | dict[int, Path] | None = None,
    remote: str | None = None,
    watched: tuple[str, ...] = (),
    repeats: RepeatPlan | None = None,
):
    """The Tune trainable of a study (``keys`` = the searched knobs) or an ablation (the grid knobs;
    the trial's ``seed`` param goes to every key of ``seed_keys``), with the trial's resources.  The
    teacher, if any, was trained by the driver beforehand (``teacher_dir``, or one per seed); trials
    only load it.  With ``remote`` (cloud storage ``<uri>/<name>``) a trial writes its run folder in a
    scratch folder of its node and its Train checkpoints to ``<remote>/trials/<id>``.  ``watched``:
    metrics that must stay finite (the study's metric); a trial that diverges fails.  ``repeats``: each
    trial trains its configuration with several seeds and reports their aggregate
    (:mod:`raykd.tune.repeats`; the teachers are then one per seed)."""
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
        if repeats is not None:
            trial_dir = Path(root) / TRIALS_DIR / trial_id
            RepeatedTrial(with_params(raw, params), trial_dir, repeats, teachers, watched).run()
        elif remote is None:
            run_trial(with_params(raw, params), Path(root) / TRIALS_DIR / trial_id, teacher_dir=teacher,
                      watched=watched)  # fmt: skip
        else:  # the driver rebuilds the trial folder from Tune's results; this node's copy is scratch
            scratch = node_local_root(name) / TRIALS_DIR / trial_id
            run_trial(with_params(raw, params), scratch, teacher_dir=teacher,
                      train_storage=join(remote, TRIALS_DIR, trial_id), watched=watched)  # fmt: skip
            shutil.rmtree(scratch, ignore_errors=True)

    return tune.with_resources(raykd_trial, trial_resources(base, repeats.parallel if repeats else None))


def trial_dirname(trial) -> str:
    """Tune's trial folder name: the trial id (the same name as the trial's run folder)."""
    return trial.trial_id
