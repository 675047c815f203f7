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

Resources (docs/cluster.md has the packing table): one worker reserves :func:`worker_bundle`
(``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs when ``use_gpu``, plus ``resources_per_worker``).
An inline trial's process holds that bundle itself; a Train-in-Tune trial's process holds a sliver of
a CPU and its ``num_workers`` Train workers hold one bundle each.  :func:`trials_that_fit` is how many
trials a set of nodes runs at once.
"""

from __future__ import annotations

import json
import math
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
        return Path(ckpt.to_directory()) if ckpt is not None else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)


#: CPU share a Train-in-Tune trial's own process asks for (it only drives the TorchTrainer; Tune rejects 0)
DRIVER_CPU = 0.01


def worker_bundle(cfg: RunConfig) -> dict[str, float]:
    """What one worker reserves: ``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs (when ``use_gpu``)
    and the extra ``resources_per_worker``."""
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        bundle["GPU"] = s.gpus_per_worker
    bundle.update(s.resources_per_worker)
    return bundle


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """Resources Tune reserves for the trial process itself.

    Inline trials train in that process, so it gets the worker's bundle; a Train-in-Tune trial's
    process only drives the TorchTrainer (whose workers reserve their own bundles), so it asks for a
    sliver of a CPU.
    """
    if cfg.scaling.num_workers > 1:
        return {"CPU": DRIVER_CPU}
    return worker_bundle(cfg)


def trial_needs(cfg: RunConfig) -> dict[str, float]:
    """Everything one running trial holds: its process plus its Train workers."""
    n = cfg.scaling.num_workers
    need = {k: n * v for k, v in worker_bundle(cfg).items()}
    if n > 1:
        need["CPU"] += DRIVER_CPU
    return need


def _fits(have: dict[str, float], need: dict[str, float]) -> int:
    """How many copies of ``need`` fit in ``have`` (Ray keeps 4 decimals; the epsilon absorbs rounding)."""
    return min(math.floor(have.get(k, 0.0) / v + 1e-6) for k, v in need.items() if v > 0)


def trials_that_fit(cfg: RunConfig, nodes: list[dict[str, float]]) -> int:
    """How many trials of ``cfg`` run at once on ``nodes`` (each node's total resources).

    Inline trials (1 worker) pack per node: a node runs as many as its scarcest resource allows, e.g.
    ``gpus_per_worker: 0.25`` puts 4 trials on each GPU.  A Train-in-Tune trial needs ``num_workers``
    worker bundles; Ray Train places them with its PACK strategy (one node when one has room, else
    spread), so the trials that fit are the bundles that fit, divided by ``num_workers``, and never
    more than the cluster's totals allow (drivers included).
    """
    bundle, n = worker_bundle(cfg), cfg.scaling.num_workers
    per_node = sum(_fits(node, bundle) for node in nodes)
    if n == 1:
        return per_node
    totals: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            totals[k] = totals.get(k, 0.0) + v
    return min(per_node // n, _fits(totals, trial_needs(cfg)))


def run_trial(
    cfg: RunConfig, run_dir: Path, teacher_dir: str | None = None, train_storage: str | None = None
) -> dict[str, Any]:
    """Train ``cfg`` as the current Tune trial, in ``run_dir``; returns the final metrics.

    ``train_storage``: where a Train-in-Tune trial keeps its Train checkpoints (a URI with cloud
    storage; default ``run_dir``)."""
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

        metrics = train_loop(cfg, TuneInlineSession(cfg.scaling.use_gpu, run_dir), run_dir, teacher_dir=teacher_dir)
    else:
        metrics = _fit_train_in_tune(cfg, run_dir, teacher_dir, train_storage)
    return metrics  # result.json was written by the loop at the last step


def _fit_train_in_tune(
    cfg: RunConfig, run_dir: Path, teacher_dir: str | None, train_storage: str | None = None
) -> dict[str, Any]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd.train.trainer import build_trainer

    # the Train run is named per trial folder: a restarted trial resumes its own snapshot
    trainer = build_trainer(cfg, run_dir, teacher_dir, callbacks=[TuneReportCallback()], controller_failure_limit=3,
                            storage_path=train_storage)  # fmt: skip
    result = trainer.fit()
    return {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_") and k != "checkpoint_path"}
