"""The method contract: what a method is, and everything it may ask of the run (:class:`MethodContext`).

A method is a :class:`Method` subclass in its own module under ``raykd/methods/``, registered with
``@METHODS.register(name)``, with a nested ``Config``: a :class:`~raykd.config.MethodConfig` whose
fields are :func:`~raykd.config.knob` s and whose class attributes are the method's static facts
(``needs_teacher``, ``uses_unlabeled``, ``logs(run)``, ``eval_heads(run)``, ``check_run(run)``).

The training loop (``raykd.train``) owns the student, its DDP wrapper, the optimiser, the EMA copy,
sampling, evaluation and checkpoints, and implements :class:`MethodContext`.  A method sees the run
only through that context: it imports nothing from ``raykd.train``, ``raykd.tune`` or the CLI, and
nothing from another method (shared helpers live in :mod:`raykd.methods.common`).

The hooks, in the order the loop calls them (every hook runs on every rank unless it says otherwise):

1. :meth:`Method.configure_model` (classmethod) — once, on the freshly built student, before DDP, the
   EMA copy and checkpoints; also on a teacher loaded from a run of this method.
2. ``Method(ctx)`` then :meth:`Method.setup` — once the student exists: build banks, tables, extra
   trainable modules (``ctx.register_module``).
3. checkpoint restore: :meth:`Method.load_state_dict` when the run resumes.
4. :meth:`Method.on_train_start` — offline stages before the first step (and again after a restart).
5. :meth:`Method.train_step` — every step: the loss and the logs.
6. :meth:`Method.on_evaluation_start` then :meth:`Method.predict` — at every evaluation.
7. :meth:`Method.state_dict` — at every checkpoint (rank 0 saves it).

Per-sample state indexed by unlabeled sample index must be identical on every rank: synchronise it
explicitly with ``ctx.all_gather`` / ``ctx.all_reduce`` (the registry's 2-rank test checks it).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Union

from raykd.config import MethodConfig
from raykd.lazy import nn, torch
from raykd.registry import METHODS

if TYPE_CHECKING:
    import contextlib

    from raykd.config import RunConfig
    from raykd.data import ArrayDataset, SSLData

__all__ = ["METHODS", "Batch", "LogValue", "Method", "MethodContext", "Prediction", "split_prediction"]

#: a log value: a float, a 0-d tensor, or a ``(numerator, denominator)`` pair averaged as Σnum/Σden
#: over the logging window and across ranks (for ratios whose denominator varies, e.g. ``pseudo_acc``)
LogValue = Union[float, "torch.Tensor", tuple[Any, Any]]  # noqa: UP007 (no torch import at definition)
#: what ``predict`` returns: the logits, or ``(logits, {head: logits})`` with the extra heads that
#: ``Config.eval_heads`` names (the loop reports ``test_<head>_acc`` and ``val_<head>_acc``)
Prediction = Union["torch.Tensor", tuple["torch.Tensor", dict[str, "torch.Tensor"]]]  # noqa: UP007


def split_prediction(out: Prediction) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits, heads)`` from either form of :data:`Prediction`."""
    return out if isinstance(out, tuple) else (out, {})


@dataclass
class Batch:
    """This rank's share of one global batch, on the training device (images still uint8).

    Attributes:
        x, y, idx: labeled images ``[b, C, H, W]``, labels and their labeled-set indices.
        u, u_idx, u_y: unlabeled images ``[mu*b, C, H, W]``, their unlabeled-pool indices and their
            hidden true labels (diagnostics only, never for training; -1 where unknown), or None when
            the method uses no unlabeled data.
        step: the 0-based global step this batch is for.
    """

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    u: torch.Tensor | None
    u_idx: torch.Tensor | None
    u_y: torch.Tensor | None
    step: int


class MethodContext(Protocol):
    """Everything a method may ask of the run it is in (``raykd.train.context.StepContext`` implements it).

    Attributes:
        run: the resolved run config.
        data: the semi-supervised data (labeled, unlabeled, val, test) on the host.
        device: this worker's device.
        rank, world_size: the DDP group (rank 0 .. world_size-1).
        num_classes: classes of the student's data.
        model: the student as called in training (DDP-wrapped when world_size > 1).
        raw_model: the unwrapped student (``features``, ``classifier``, ``feature_map`` access).
        teacher: the frozen teacher (eval mode, no gradients, never optimised), or None.
        teacher_run: the run config that trained the teacher, or None.
    """

    run: RunConfig
    data: SSLData
    device: torch.device
    rank: int
    world_size: int
    model: nn.Module
    raw_model: nn.Module
    teacher: nn.Module | None
    teacher_run: RunConfig | None

    @property
    def num_classes(self) -> int: ...

    def weak(self, x: torch.Tensor) -> torch.Tensor:
        """Weakly augmented (flip + translate), normalised float views of uint8 images ``x``."""

    def strong(self, x: torch.Tensor) -> torch.Tensor:
        """Strongly augmented (RandAugment + Cutout), normalised float views of uint8 images ``x``."""

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images without augmentation (offline stages, evaluation)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on GPU when ``train.amp``; a no-op otherwise."""

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (``op`` max / min) a tensor over ranks, in place; identity with one worker."""

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors from all ranks along dim 0, in rank order."""

    def register_module(self, name: str, module: nn.Module) -> nn.Module:
        """Make ``module`` trainable beside the student: moved to the device, DDP-wrapped when
        distributed (gradients averaged), optimised and checkpointed by the loop.  Call it in
        :meth:`Method.setup` and call the module through the returned object."""

    def teacher_table(self, prefix: str, key: object, build: Callable[[], dict]) -> dict:
        """A per-sample table derived from the frozen teacher, identical on every rank: rank 0 runs
        ``build()`` once per ``key`` (a JSON-able description of all it depends on) and caches it
        beside the teacher; every rank then loads it."""

    def evaluate(self, model: nn.Module, ds: ArrayDataset) -> tuple[float, dict[str, float]]:
        """Accuracy of :meth:`Method.predict` on ``ds`` and of each named head, sharded over ranks
        and all-reduced (every rank must call it)."""


class Method(abc.ABC):
    """Base class of every training method.

    Attributes:
        Config: the method's knobs and static facts (a MethodConfig subclass with a
            ``name: Literal[...]`` field).
        ctx: what the method may ask of the run (:class:`MethodContext`).
        cfg: the method's validated knobs (``ctx.run.method``).
    """

    Config: ClassVar[type[MethodConfig]]

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.run.method

    @property
    def model(self) -> nn.Module:
        """The student as called in training (DDP-wrapped when world size > 1)."""
        return self.ctx.model

    @classmethod
    def configure_model(cls, model: nn.Module, run: RunConfig, image_shape: tuple[int, int, int]) -> nn.Module:
        """The network this method trains, built around the registered ``model`` (default: ``model``).

        Called by the loop once on every rank, on the freshly built student before DDP, the EMA copy
        and checkpoints (and on a teacher loaded from a run of this method); it must be
        deterministic given the torch seed.
        """
        return model

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Build method-specific state; called once on every rank after the student exists."""

    def on_train_start(self) -> None:  # noqa: B027 - optional hook
        """Offline stages, on every rank, once before the first step (and again after a restart)."""

    @abc.abstractmethod
    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, LogValue]]:
        """This step's scalar loss and its logs (exactly the names ``Config.logs(run)`` declares)."""

    def on_evaluation_start(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called on every rank before each evaluation of ``model`` (e.g. to calibrate vote weights)."""

    def predict(self, model: nn.Module, x: torch.Tensor) -> Prediction:
        """Evaluation logits for normalised images ``x`` (the loop passes the EMA or raw student), or
        ``(logits, {head: logits})`` for the heads ``Config.eval_heads(run)`` names."""
        return model(x)

    def state_dict(self) -> dict[str, Any]:
        """Per-sample state that must survive a restart (saved by rank 0 at every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict` on every rank when the run resumes."""
