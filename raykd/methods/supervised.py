"""Supervised baseline: cross-entropy on the labeled data only (weak augmentation)."""

from __future__ import annotations

from typing import Literal

from raykd.config import MethodConfig
from raykd.lazy import F
from raykd.methods.base import METHODS, Batch, Method


@METHODS.register("supervised")
class Supervised(Method):
    """Train on the labeled samples alone; the lower bound every SSL method must beat."""

    class Config(MethodConfig):
        name: Literal["supervised"] = "supervised"
        uses_unlabeled = False

        @classmethod
        def logs(cls, run) -> tuple[str, ...]:
            return ("loss_x",)

    def train_step(self, batch: Batch):
        with self.ctx.autocast():
            logits = self.model(self.ctx.weak(batch.x))
        loss = F.cross_entropy(logits.float(), batch.y)
        return loss, {"loss_x": loss.detach()}
