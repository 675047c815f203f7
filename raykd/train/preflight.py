"""The driver's checks of a run before Ray starts and before any file is written.

Config validation (``raykd.config``) refuses what the config alone shows, without importing torch.
What needs the machine — the data on disk, the model built from its arguments, a teacher checkpoint,
a GPU, ``torch.compile`` — is checked here, on the driver, by ``raykd train``, ``raykd study run``
and ``raykd ablate`` alike, so that a bad value fails in seconds with the field named instead of
inside a worker after Ray started.
"""

from __future__ import annotations

import os
import re
import sys

import torch

from raykd.config import RunConfig
from raykd.data import SSLData, data_of
from raykd.errors import ConfigError
from raykd.train import loop
from raykd.train.teacher import check_checkpoint_teacher

__all__ = ["check_address", "preflight", "warnings_of"]

_ADDRESS = re.compile(r"^(auto|local|(ray|https?)://[^\s/:]+(:\d+)?/?|[A-Za-z0-9][A-Za-z0-9.\-]*:\d+|\[[0-9a-fA-F:]+\]:\d+)$")


def check_address(address: str | None) -> str | None:
    """``--address`` must be a Ray address (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``)."""
    if address is not None and not _ADDRESS.match(address):
        raise ConfigError("--address", f"{address!r} is not a Ray address; use auto (the cluster this machine is "
                          "part of), HOST:PORT of the head node (e.g. 10.0.0.1:6379) or ray://HOST:10001")  # fmt: skip
    return address


def preflight(cfg: RunConfig, address: str | None = None, prefix: str = "") -> SSLData:
    """Every check of ``cfg`` that can run on the driver; returns its data.  ``prefix`` is where the
    run config sits in the user's file (``base.`` in a study or ablation), for the field names."""
    try:
        data = _preflight(cfg, check_address(address))
    except ConfigError as e:
        if not prefix or e.field.startswith(prefix) or e.field.startswith("--"):
            raise
        raise ConfigError(prefix + e.field, e.message) from None
    for line in warnings_of(cfg, prefix):  # once nothing is wrong
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return data


def warnings_of(cfg: RunConfig, prefix: str = "") -> list[str]:
    """Legitimate but probably unintended settings (printed, not refused)."""
    t, out = cfg.train, []
    if t.eval_every > t.steps:
        out.append(f"{prefix}train.eval_every ({t.eval_every}) > {prefix}train.steps ({t.steps}): the run "
                   "evaluates and checkpoints only at its last step; a lost worker restarts it from step 0")
    return out


def _preflight(cfg: RunConfig, address: str | None) -> SSLData:
    local = not (address or os.environ.get("RAY_ADDRESS"))  # the workers run on this machine
    if cfg.scaling.use_gpu and local and not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu", "true but this machine has no CUDA GPU; set it to false or join a GPU "
                          "cluster with --address")  # fmt: skip
    if cfg.scaling.resources_per_worker and local:
        raise ConfigError("scaling.resources_per_worker", "names resources of a cluster's nodes, which a local Ray "
                          "does not have; join the cluster with --address or remove it")  # fmt: skip
    data = data_of(cfg)  # the data is on disk (ConfigError on data.root otherwise)
    check_model(cfg, data)
    if cfg.train.compile and local:
        device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
        reason = loop.compile_unavailable(device)
        if reason is not None:
            raise loop.compile_error(device, reason)
    check_checkpoint_teacher(cfg)  # a teacher.checkpoint is read (weights-only)
    return data


def check_model(cfg: RunConfig, data: SSLData) -> None:
    """Build the student once, on the meta device (no memory, no time): a model argument it rejects
    (``model.width: -3``) is a ConfigError naming the model and its arguments."""
    try:
        with torch.device("meta"):
            loop.build_student(cfg, data)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the builder's own message, with the arguments that caused it
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.model.args().items()) or "its defaults"
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("model", f"{cfg.model.name} cannot be built with {args}: {msg}; fix the model's "
                          "arguments") from None  # fmt: skip
