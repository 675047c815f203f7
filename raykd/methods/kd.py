"""Vanilla knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv 1503.02531) in its
semi-supervised form (docs/methods.md).

The frozen teacher and the student see the same weakly augmented views of a labeled batch and an
unlabeled batch (``train.uratio`` × as many).  The student learns

    L = (1 − α) · CE(y, z_s[labeled]) + α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))[labeled ∪ unlabeled]

The T² factor keeps the distillation gradients' scale independent of T (Hinton's form; the
RepDistiller form γ·CE + α·KL is the same with γ = 1 − α).  Decision (ours; the paper leaves it
open): one concatenated student forward pass over labeled and unlabeled views, so BN statistics are
shared as in FixMatch; the KL term is averaged over every image of the batch.
"""

from __future__ import annotations

from typing import Literal

from raykd.config import MethodConfig, knob
from raykd.lazy import F, torch
from raykd.methods.base import METHODS, Batch, Method
from raykd.methods.common import kd_loss

__all__ = ["KD", "kd_loss"]


@METHODS.register("kd")
class KD(Method):
    """Vanilla KD: CE on labels plus temperature-scaled KL to a frozen teacher on labeled + unlabeled data."""

    class Config(MethodConfig):
        name: Literal["kd"] = "kd"
        temperature: float = knob(4.0, search={"loguniform": [1.0, 10.0]}, gt=0.0, help="softening temperature T")
        alpha: float = knob(
            0.9, search={"uniform": [0.1, 0.99]}, ge=0.0, le=1.0, help="mixing weight of the KD term (CE gets 1-alpha)"
        )

        needs_teacher = True

        @classmethod
        def logs(cls, run) -> tuple[str, ...]:
            return ("loss_x", "loss_kd", "teacher_agree")

    def train_step(self, batch: Batch):
        ctx, cfg = self.ctx, self.cfg
        b = batch.x.shape[0]
        images = batch.x if batch.u is None else torch.cat([batch.x, batch.u])
        views = ctx.weak(images)
        with ctx.autocast():
            z_s = self.model(views)
            with torch.no_grad():
                z_t = ctx.teacher(views)
        loss_x = F.cross_entropy(z_s[:b].float(), batch.y)
        loss_kd = kd_loss(z_s, z_t, cfg.temperature)
        loss = (1.0 - cfg.alpha) * loss_x + cfg.alpha * loss_kd
        agree = (z_s.argmax(-1) == z_t.argmax(-1)).float().mean()
        return loss, {"loss_x": loss_x.detach(), "loss_kd": loss_kd.detach(), "teacher_agree": agree}
