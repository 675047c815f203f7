"""The two small interfaces the training loop runs against.

* :class:`Session` — where the loop runs: rank, world size, device, ``report`` (metrics plus an
  optional checkpoint folder) and ``latest_checkpoint``.  :class:`LocalSession` runs in-process with
  one worker (tests, debugging, and later the inline single-worker study trial); the Ray Train
  implementation lives in :mod:`raykd.train.trainer`.  Methods never see which one is in use.
* :class:`StepContext` — what a method sees: the run config, device, the student (DDP-wrapped when
  distributed), augmentations, autocast and collective helpers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from raykd.config import RunConfig
from raykd.data import SSLData
from raykd.data.augment import Augmenter


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Publish metrics (all ranks call it; rank 0's checkpoint folder, if any, is persisted)."""

    def latest_checkpoint(self) -> Path | None:
        """Folder of the latest persisted checkpoint of this run, or None on a fresh start."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device and wrap for data parallelism when distributed."""


class LocalSession:
    """In-process, single-worker session: checkpoints are copied to ``run_dir/checkpoints/step_N``.

    Args:
        run_dir: folder of the run (checkpoints, ``progress.jsonl``).
        device: torch device (default CPU).
        keep: number of checkpoints kept.
    """

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu", keep: int = 2):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.keep = keep
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            root = self.run_dir / "checkpoints"
            dest = root / f"step_{int(metrics['step']):09d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            for old in sorted(root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("step_*"))
        return found[-1] if found else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)


@dataclass
class StepContext:
    """What a method sees of the training run.

    Attributes:
        run: the resolved run config.
        data: the semi-supervised data (labeled, unlabeled, val, test) on the host.
        device: this worker's device.
        rank, world_size: the DDP group.
        model: the student as called in training (DDP-wrapped when world_size > 1).
        raw_model: the unwrapped student (for ``features``/``classifier`` access).
        augmenter: the batched on-device augmentation pipeline.
        generator: this rank's RNG for augmentations (seeded by run seed, rank and step).
        teacher: the frozen teacher (eval mode, no gradients, not optimised) or None.
        teacher_dir: the teacher's run folder (methods cache per-teacher tables there) or None.
        extras: the method's ``extra_modules()`` as the loop prepared them (moved to the device and
            DDP-wrapped when distributed); call them through these so their gradients are averaged.
    """

    run: RunConfig
    data: SSLData
    device: torch.device
    rank: int
    world_size: int
    model: nn.Module
    raw_model: nn.Module
    augmenter: Augmenter
    generator: torch.Generator
    channels_last: bool = False
    teacher: nn.Module | None = None
    teacher_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def weak(self, x: torch.Tensor) -> torch.Tensor:
        """Weakly augmented, normalised float views of uint8 images ``x``."""
        return self._format(self.augmenter.weak(x, generator=self.generator))

    def strong(self, x: torch.Tensor) -> torch.Tensor:
        """Strongly augmented (RandAugment + Cutout), normalised float views of uint8 images ``x``."""
        return self._format(self.augmenter.strong(x, generator=self.generator))

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images without augmentation (evaluation, offline stages)."""
        return self._format(self.augmenter.normalize(x.float().div_(255.0) if x.dtype == torch.uint8 else x))

    def autocast(self):
        """bfloat16 autocast on GPU when ``train.amp``; a no-op otherwise."""
        if self.run.train.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max/min) a tensor over ranks, in place; identity with one worker."""
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank.

        DDP averages gradients, so parameters agree; BN statistics are updated from each rank's own
        share of the batch and drift apart between DDP's per-forward broadcasts.  The loop calls this
        before every evaluation and checkpoint so that all ranks evaluate and save the same model.
        """
        if self.world_size > 1 and dist.is_initialized():
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors from all ranks along dim 0 (rank order)."""
        if self.world_size == 1 or not dist.is_initialized():
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)


RESULT_FILE = "result.json"


def write_result(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run_dir/result.json`` (a finished run's metrics) atomically."""
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(run_dir / RESULT_FILE)


def append_progress(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``run_dir/progress.jsonl`` (rank 0 only; the driver tails it)."""
    record = {"time": time.time(), **record}
    with open(run_dir / "progress.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
