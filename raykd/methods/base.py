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
* ``wrap_model(model, run, image_shape)`` (classmethod, default identity) turns the built student
  into the network the method trains (TSKD adds exits); the loop calls it before DDP, the EMA copy
  and checkpoints, so all three hold the wrapped network.
* ``eval_heads(run)`` (classmethod) names extra evaluation outputs; ``predict_all(model, x)`` returns
  ``(logits, {head: logits})``, and the loop reports each head's accuracy as ``test_<head>_acc`` (and
  ``val_<head>_acc`` with a validation split); :meth:`Method.eval_metrics` lists those names so a
  study can select on them.  ``before_evaluation(model)`` runs on every rank before each evaluation.
* ``state_dict()`` / ``load_state_dict()`` for per-sample state that must survive a restart.
* ``check_run(run)`` (classmethod) puts the method's rules on the rest of a run config (SLaM needs
  ``data.val_per_class > 0``); it runs whenever a run config is parsed and raises ConfigError.

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
    from raykd.config import RunConfig
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

    @classmethod  # noqa: B027 - optional hook
    def check_run(cls, run: RunConfig) -> None:
        """Rules the method puts on the rest of a run config (e.g. a validation split it needs);
        raise :class:`~raykd.errors.ConfigError` naming the field.  Called when a run config is parsed."""

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

    @classmethod
    def wrap_model(cls, model: nn.Module, run: RunConfig, image_shape: tuple[int, int, int]) -> nn.Module:
        """The network this method trains, built around the registered ``model`` (default: ``model``).

        Called once on the freshly built student (and on a teacher loaded from a run of this method),
        before DDP and the EMA copy; it must be deterministic given the torch seed.
        """
        return model

    @classmethod
    def eval_heads(cls, run: RunConfig) -> tuple[str, ...]:
        """Names of the extra logits :meth:`predict_all` returns (default: none)."""
        return ()

    @classmethod
    def eval_metrics(cls, run: RunConfig) -> tuple[str, ...]:
        """The metric names the loop reports for :meth:`eval_heads`."""
        splits = ("test", "val") if run.data.val_per_class > 0 else ("test",)
        return tuple(f"{split}_{head}_acc" for split in splits for head in cls.eval_heads(run))

    def predict_all(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Evaluation logits and the extra logits named by :meth:`eval_heads` (default: ``predict``, none)."""
        return self.predict(model, x), {}

    def before_evaluation(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called on every rank before each evaluation of ``model`` (e.g. to calibrate vote weights)."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules besides the student (optimised and checkpointed by the loop)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass
