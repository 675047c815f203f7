"""The method contract.

A method is a subclass of :class:`Method` in its own module under ``raykd/methods/``, registered with
``@METHODS.register(name)``, with a nested ``Config`` (a :class:`~raykd.config.MethodConfig` whose
fields are :func:`~raykd.config.knob` s: default, search range, help).  The training loop owns the
student model, its DDP wrapper, the optimiser, the EMA copy, sampling, evaluation and checkpoints;
a method only turns a batch into a loss:

* ``setup()`` builds what the method needs beyond the student (memory banks, teacher handles).
* ``before_training()`` runs offline stages once before the first step (trusted subsets, α/k tables).
* ``train_step(batch) -> (loss, logs)``: one step's loss.  ``logs`` maps names to floats, 0-d tensors,
  or ``(numerator, denominator)`` pairs, which are averaged as Σnum/Σden over the logging window and
  across ranks (use that for ratios such as ``pseudo_acc`` whose denominator varies).
* ``predict(model, x) -> logits`` used for evaluation (the loop passes the EMA or raw student).
* ``state_dict()`` / ``load_state_dict()`` for per-sample state that must survive a restart.

Per-sample state indexed by unlabeled sample index must be identical on every rank: synchronise it
explicitly with ``ctx.all_gather`` / ``ctx.all_reduce``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from raykd.config import MethodConfig
from raykd.registry import Registry

if TYPE_CHECKING:
    from raykd.train.context import StepContext

METHODS: Registry = Registry("method", "method.name")

LogValue = float | torch.Tensor | tuple[Any, Any]


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


class Method(abc.ABC):
    """Base class of every training method.

    Attributes:
        Config: the method's knobs (a MethodConfig subclass with a ``name: Literal[...]`` field).
        uses_unlabeled: whether batches carry unlabeled data (``train.uratio`` × B per step).
        needs_teacher: whether the run config must name a teacher (``ctx.teacher`` is then the frozen
            teacher model, in eval mode, without gradients, outside the optimiser).
        logs: the names ``train_step`` logs (reported as metrics; a study may optimise them).
        ctx: the step context (device, model, augmentations, ranks, config).
        cfg: the method's validated knobs.
    """

    Config: ClassVar[type[MethodConfig]]
    uses_unlabeled: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    logs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.cfg = ctx.run.method

    @property
    def model(self) -> nn.Module:
        """The student as called in training (DDP-wrapped when world size > 1)."""
        return self.ctx.model

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Build method-specific state; called once after the student exists."""

    def before_training(self) -> None:  # noqa: B027 - optional hook
        """Offline stages that run once before the first step (and again after a restart)."""

    @abc.abstractmethod
    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, LogValue]]:
        """Return this step's scalar loss and its logs."""

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Evaluation logits for normalised images ``x`` (default: the model's logits)."""
        return model(x)

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules besides the student (optimised and checkpointed by the loop)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass
