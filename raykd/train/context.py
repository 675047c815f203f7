"""The two small interfaces the training loop runs against.

* :class:`Session` — where the loop runs: rank, world size, device, ``report`` (metrics plus an
  optional checkpoint folder) and ``latest_checkpoint``.  :class:`LocalSession` runs in-process with
  one worker (tests, debugging, benchmarks); the Ray Train one lives in :mod:`raykd.train.trainer`
  and the inline study trial's in :mod:`raykd.tune.trial`.  Methods never see which one is in use.
* :class:`StepContext` — the loop's implementation of :class:`raykd.methods.base.MethodContext`,
  everything a method may ask of the run.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from raykd.config import RunConfig
from raykd.data import ArrayDataset, SSLData
from raykd.data.augment import Augmenter
from raykd.methods.base import Method, split_prediction
from raykd.train.runfolder import LOCAL_CHECKPOINTS
from raykd.train.teacher import teacher_table


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
            root = self.run_dir / LOCAL_CHECKPOINTS
            dest = root / f"step_{int(metrics['step']):09d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            for old in sorted(root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / LOCAL_CHECKPOINTS).glob("step_*"))
        return found[-1] if found else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)


@dataclass
class StepContext:
    """The loop's :class:`raykd.methods.base.MethodContext` (see there for what each member means),
    plus what only the loop uses: the method it serves, the registered extra modules, the teacher's
    folder and how to prepare a module for data parallelism.

    Attributes:
        augmenter: the batched on-device augmentation pipeline.
        generator: this rank's RNG for augmentations (seeded by run seed, rank and step).
        channels_last: whether images are handed out in channels_last memory format.
        teacher_dir: the teacher's run folder (teacher tables are cached there) or None.
        prepare: moves a module to the device and wraps it for DDP (the session's ``prepare_model``).
        modules: the extra trainable modules registered by the method, as prepared.
        method: the method this context serves (set by the loop right after building it).
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
    teacher_run: RunConfig | None = None
    teacher_dir: Path | None = None
    prepare: Callable[[nn.Module], nn.Module] | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    method: Method | None = None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def weak(self, x: torch.Tensor) -> torch.Tensor:
        return self._format(self.augmenter.weak(x, generator=self.generator))

    def strong(self, x: torch.Tensor) -> torch.Tensor:
        return self._format(self.augmenter.strong(x, generator=self.generator))

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return self._format(self.augmenter.normalize(x.float().div_(255.0) if x.dtype == torch.uint8 else x))

    def autocast(self):
        if self.run.train.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1 or not dist.is_initialized():
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank.

        DDP averages gradients, so parameters agree; BN statistics are updated from each rank's own
        share of the batch and drift apart between DDP's per-forward broadcasts.  The loop calls this
        before every evaluation and checkpoint so that all ranks evaluate and save the same model.
        """
        if self.world_size > 1 and dist.is_initialized():
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def register_module(self, name: str, module: nn.Module) -> nn.Module:
        if name in self.modules:
            raise ValueError(f"a module named {name!r} is already registered")
        module = module.to(self.device)
        prepared = self.prepare(module) if self.prepare is not None else module
        self.modules[name] = prepared
        return prepared

    def teacher_table(self, prefix: str, key: object, build: Callable[[], dict]) -> dict:
        if self.teacher_dir is None:
            raise ValueError("teacher_table needs a teacher (this run has none)")
        return teacher_table(self.teacher_dir, self.rank, self.world_size, prefix, key, build)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ds: ArrayDataset) -> tuple[float, dict[str, float]]:
        """Accuracy of the method's ``predict`` and of each head it names, sharded over ranks and
        all-reduced (every rank calls it)."""
        was_training = model.training
        model.eval()
        idx = torch.arange(self.rank, len(ds), self.world_size)
        heads = list(type(self.run.method).eval_heads(self.run))
        counts = torch.zeros(2 + len(heads), dtype=torch.float64, device=self.device)  # [main, *heads, n]
        for chunk in idx.split(self.run.train.eval_batch_size):
            x = ds.images[chunk].to(self.device, non_blocking=True)
            y = ds.labels[chunk].to(self.device, non_blocking=True)
            with self.autocast():
                logits, extra = split_prediction(self.method.predict(model, self.plain(x)))
            for i, z in enumerate([logits, *(extra[h] for h in heads)]):
                counts[i] += (z.argmax(dim=-1) == y).sum()
            counts[-1] += len(chunk)
        self.all_reduce(counts)
        model.train(was_training)
        acc = (counts[:-1] / counts[-1].clamp_min(1)).tolist()
        return acc[0], dict(zip(heads, acc[1:], strict=True))
