"""What a trial holds, how many trials fit on a cluster, and starting (or joining) Ray for a study.

Resources (docs/cluster.md has the packing table): one worker reserves :func:`worker_bundle`
(``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs when ``use_gpu``, plus ``resources_per_worker``).
An inline trial's process holds that bundle itself; a Train-in-Tune trial's process holds a sliver of
a CPU and its ``num_workers`` Train workers hold one bundle each.  :func:`trials_that_fit` is how many
trials a set of nodes runs at once.
"""

from __future__ import annotations

import math
from typing import Any

from raykd.config import RunConfig
from raykd.errors import ConfigError
from raykd.train.trainer import init_ray, worker_bundle

__all__ = ["DRIVER_CPU", "cluster_nodes", "concurrency", "init_ray_for", "trial_needs", "trial_resources",
           "trials_that_fit", "worker_bundle"]  # fmt: skip


#: CPU share a Train-in-Tune trial's own process asks for (it only drives the TorchTrainer; Tune rejects 0)
DRIVER_CPU = 0.01


def trial_resources(cfg: RunConfig, parallel: int | None = None) -> Any:
    """Resources Tune reserves for the trial process itself.

    Inline trials train in that process, so it gets the worker's bundle; a Train-in-Tune trial's
    process only drives the TorchTrainer (whose workers reserve their own bundles), so it asks for a
    sliver of a CPU.  A trial of a study with seed repeats (``parallel`` seeds at once,
    :mod:`raykd.tune.repeats`) only watches its seeds: inline, it reserves a placement group of a
    sliver plus ``parallel`` worker bundles, where its seeds' tasks run; with DDP, the sliver (each
    seed's Train driver and workers reserve their own).
    """
    if cfg.scaling.num_workers > 1:
        return {"CPU": DRIVER_CPU}
    if parallel is not None:
        from ray.tune import PlacementGroupFactory

        return PlacementGroupFactory([{"CPU": DRIVER_CPU}] + [worker_bundle(cfg)] * parallel)
    return worker_bundle(cfg)


def trial_needs(cfg: RunConfig, parallel: int | None = None) -> dict[str, float]:
    """Everything one running trial holds: its process plus its Train workers; with seed repeats,
    its process plus ``parallel`` runs (each with its Train driver when DDP)."""
    n = cfg.scaling.num_workers
    need = {k: n * v for k, v in worker_bundle(cfg).items()}
    if n > 1:
        need["CPU"] += DRIVER_CPU
    if parallel is not None:
        need = {k: parallel * v for k, v in need.items()}
        need["CPU"] += DRIVER_CPU
    return need


def _fits(have: dict[str, float], need: dict[str, float]) -> int:
    """How many copies of ``need`` fit in ``have`` (Ray keeps 4 decimals; the epsilon absorbs rounding)."""
    return min(math.floor(have.get(k, 0.0) / v + 1e-6) for k, v in need.items() if v > 0)


def trials_that_fit(cfg: RunConfig, nodes: list[dict[str, float]], parallel: int | None = None) -> int:
    """How many trials of ``cfg`` run at once on ``nodes`` (each node's total resources).

    Inline trials (1 worker) pack per node: a node runs as many as its scarcest resource allows, e.g.
    ``gpus_per_worker: 0.25`` puts 4 trials on each GPU.  A Train-in-Tune trial needs ``num_workers``
    worker bundles; Ray Train places them with its PACK strategy (one node when one has room, else
    spread), so the trials that fit are the bundles that fit, divided by ``num_workers``, and never
    more than the cluster's totals allow (drivers included).
    """
    if parallel is not None:  # a repeated configuration holds `parallel` runs (the watcher's sliver aside)
        return trials_that_fit(cfg, nodes) // parallel
    bundle, n = worker_bundle(cfg), cfg.scaling.num_workers
    per_node = sum(_fits(node, bundle) for node in nodes)
    if n == 1:
        return per_node
    totals: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            totals[k] = totals.get(k, 0.0) + v
    return min(per_node // n, _fits(totals, trial_needs(cfg)))


def concurrency(
    base: RunConfig,
    num_trials: int,
    cap: int | None,
    cluster: dict[str, float],
    nodes: list[dict[str, float]] | None = None,
    joined: bool = False,
    parallel: int | None = None,
) -> int:
    """How many trials run at once: what the nodes fit (:func:`~raykd.tune.trial.trials_that_fit`), capped
    by ``cap`` and the trial count.

    Tune counts only each trial's own process; a Train-in-Tune trial's workers reserve their own
    placement group, so raykd computes the fit from everything a trial holds.  ``nodes``: each alive
    node's resources (default: the cluster's totals as one node).  ``joined`` (an existing cluster,
    which may autoscale): an explicit ``cap`` is kept even above what fits now, so that the waiting
    trials make the autoscaler add nodes.  ``parallel``: the seeds of one configuration that run at
    once, in a study with seed repeats.
    """
    fits = trials_that_fit(base, nodes if nodes is not None else [cluster], parallel)
    if joined and cap:
        return min(cap, num_trials)
    if fits < 1:
        need = trial_needs(base, parallel)
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


def init_ray_for(study_base: RunConfig, address: str | None, parallel: int | None = None) -> dict[str, float]:
    """Start (or join) Ray for a study; returns the cluster's resources.

    The dashboard stays on when trials use Train-in-Tune: without it an ASHA-stopped trial leaks its
    Train placement group and the study hangs (measured on
    Ray 2.58).  Inline trials need no State API.
    """
    train_in_tune = study_base.scaling.num_workers > 1
    init_ray(trial_needs(study_base, parallel)["CPU"], address, include_dashboard=train_in_tune)
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


