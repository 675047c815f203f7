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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.config import RunConfig, dump_run_config
from raykd.train.context import RESULT_FILE

TRIALS_DIR = "trials"


class TuneInlineSession:
    """The loop's session inside a Tune function trainable (one worker, in the trial process)."""

    rank = 0
    world_size = 1

    def __init__(self, use_gpu: bool) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self) -> Path | None:
        from ray import tune

        ckpt = tune.get_checkpoint()
        return Path(ckpt.to_directory()) if ckpt is not None else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """Resources Tune reserves for the trial process itself.

    Inline trials train in that process, so it gets the worker's CPUs/GPUs; a Train-in-Tune trial's
    process only drives the TorchTrainer (whose workers reserve their own resources), so it asks for
    a sliver of a CPU (Tune rejects zero).
    """
    s = cfg.scaling
    if s.num_workers > 1:
        return {"CPU": 0.01}
    res = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        res["GPU"] = s.gpus_per_worker
    return res


def trial_needs(cfg: RunConfig) -> dict[str, float]:
    """Everything one running trial holds: its process plus its Train workers."""
    s = cfg.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker + (0.01 if s.num_workers > 1 else 0.0)}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    return need


def run_trial(cfg: RunConfig, run_dir: Path, teacher_dir: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` as the current Tune trial, in ``run_dir``; returns the final metrics."""
    from ray import tune

    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / RESULT_FILE
    if result_path.exists():  # finished before the driver was interrupted: keep it, never re-run
        metrics = json.loads(result_path.read_text())
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        return metrics
    (run_dir / "config.yaml").write_text(dump_run_config(cfg))
    if cfg.scaling.num_workers == 1:
        from raykd.train.loop import train_loop

        metrics = train_loop(cfg, TuneInlineSession(cfg.scaling.use_gpu), run_dir, teacher_dir=teacher_dir)
    else:
        metrics = _fit_train_in_tune(cfg, run_dir, teacher_dir)
    return metrics  # result.json was written by the loop at the last step


def _fit_train_in_tune(cfg: RunConfig, run_dir: Path, teacher_dir: str | None) -> dict[str, Any]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.train.trainer import build_trainer

    # the Train run is named per trial folder: a restarted trial resumes its own snapshot
    trainer = build_trainer(cfg, run_dir, teacher_dir, callbacks=[TuneReportCallback()], controller_failure_limit=3)
    result = trainer.fit()
    return {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_") and k != "checkpoint_path"}
