"""FixMatch (Sohn et al., NeurIPS 2020, arXiv 2001.07685) (docs/methods.md).

One concatenated forward pass over weak labeled, weak unlabeled and strong unlabeled views (shared BN
statistics).  The weak view's prediction, detached, gives a pseudo-label; samples whose top
probability reaches the threshold τ (``max p >= τ``) train the strong view towards it:

    L = CE(y, z_l) + λ_u · (1 / μB) Σ_b 1[max q_b >= τ] · H(ŷ_b, softmax(z_s_b))

L_u is normalised by the number of unlabeled samples μB, not by the number that pass the mask.
``hard_label: false`` uses the soft target softmax(z_w / T) instead of the arg-max; the mask is still
computed on softmax(z_w).  Evaluation uses the EMA model (``train.ema``), as in the paper.

Logs: ``loss_x``, ``loss_u``, ``mask_rate`` (fraction of unlabeled samples over τ) and ``pseudo_acc``
(accuracy of the masked pseudo-labels against the hidden labels; a diagnostic only), and with
open-set data ``mask_rate_seen`` / ``mask_rate_unseen``: the mask rate over unlabeled samples of seen
classes (hidden label >= 0) and over open-set samples (hidden label -2; see raykd.data.split).
"""

from __future__ import annotations

from typing import Literal

from raykd.config import MethodConfig, RunConfig, knob
from raykd.lazy import F
from raykd.methods.base import METHODS, Batch, Method
from raykd.methods.common import (
    fixmatch_unsup_loss,
    pseudo_label_accuracy,
    seen_unseen_means,
    seen_unseen_names,
    weak_strong_views,
)

__all__ = ["FixMatch", "fixmatch_unsup_loss", "pseudo_label_accuracy", "seen_unseen_means"]


@METHODS.register("fixmatch")
class FixMatch(Method):
    """FixMatch: confidence-thresholded pseudo-labels on weak views train the strong views."""

    class Config(MethodConfig):
        name: Literal["fixmatch"] = "fixmatch"
        threshold: float = knob(0.95, search={"uniform": [0.70, 0.99]}, ge=0.0, le=1.0, help="confidence threshold tau")
        lambda_u: float = knob(1.0, search={"loguniform": [0.25, 4.0]}, ge=0.0, help="weight of the unlabeled loss")
        hard_label: bool = knob(True, search={"choice": [True, False]}, help="arg-max (true) or soft pseudo-labels")
        temperature: float = knob(
            0.5,
            search={"uniform": [0.25, 1.0]},
            gt=0.0,
            help="soft pseudo-label temperature (hard_label=false)",
        )

        @classmethod
        def logs(cls, run: RunConfig) -> tuple[str, ...]:
            open_set = seen_unseen_names("mask_rate") if run.data.open_set is not None else ()
            return ("loss_x", "loss_u", "mask_rate", "pseudo_acc", *open_set)

    def train_step(self, batch: Batch):
        cfg = self.cfg
        z_l, z_w, z_s = weak_strong_views(self.ctx, self.model, batch)
        loss_x = F.cross_entropy(z_l.float(), batch.y)
        loss_u, mask, pseudo = fixmatch_unsup_loss(z_w, z_s, cfg.threshold, cfg.hard_label, cfg.temperature)
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_rate": mask.mean()}
        logs["pseudo_acc"] = pseudo_label_accuracy(pseudo, mask, batch.u_y)
        if self.ctx.run.data.open_set is not None:  # the mask rate on seen-class vs open-set samples
            logs.update(seen_unseen_means("mask_rate", mask, batch.u_y))
        return loss, logs
