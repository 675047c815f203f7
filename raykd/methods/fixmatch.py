"""FixMatch (Sohn et al., NeurIPS 2020, arXiv 2001.07685) — METHODS.md §2.

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

import torch
import torch.nn.functional as F

from raykd.config import MethodConfig, knob
from raykd.data.split import UNSEEN
from raykd.methods.base import METHODS, Batch, Method


def fixmatch_unsup_loss(
    logits_w: torch.Tensor,
    logits_s: torch.Tensor,
    threshold: float,
    hard_label: bool = True,
    temperature: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch's unlabeled loss.

    Args:
        logits_w: logits of the weak views ``[N, C]`` (detached here: no gradient flows through the
            pseudo-label path).
        logits_s: logits of the strong views ``[N, C]``.
        threshold: confidence threshold τ; a sample counts when its top probability is >= τ.
        hard_label: arg-max pseudo-labels (True) or soft targets softmax(z_w / temperature).
        temperature: sharpening temperature of the soft targets.

    Returns:
        ``(loss_u, mask, pseudo_label)``: the loss normalised by N, the float mask ``[N]`` and the
        arg-max pseudo-labels ``[N]``.
    """
    logits_w = logits_w.detach().float()
    probs = logits_w.softmax(dim=-1)
    max_p, pseudo = probs.max(dim=-1)
    mask = (max_p >= threshold).float()
    log_p_s = F.log_softmax(logits_s.float(), dim=-1)
    if hard_label:
        per_sample = F.nll_loss(log_p_s, pseudo, reduction="none")
    else:
        target = (logits_w / temperature).softmax(dim=-1)
        per_sample = -(target * log_p_s).sum(dim=-1)
    return (per_sample * mask).mean(), mask, pseudo


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

    logs = ("loss_x", "loss_u", "mask_rate", "pseudo_acc", "mask_rate_seen", "mask_rate_unseen")

    def forward_views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of weak labeled, weak unlabeled and strong unlabeled views from one forward pass."""
        ctx = self.ctx
        b, n = batch.x.shape[0], batch.u.shape[0]
        inputs = torch.cat([ctx.weak(batch.x), ctx.weak(batch.u), ctx.strong(batch.u)])
        with ctx.autocast():
            logits = self.model(inputs)
        return logits[:b], logits[b : b + n], logits[b + n :]

    def train_step(self, batch: Batch):
        cfg = self.cfg
        z_l, z_w, z_s = self.forward_views(batch)
        loss_x = F.cross_entropy(z_l.float(), batch.y)
        loss_u, mask, pseudo = fixmatch_unsup_loss(z_w, z_s, cfg.threshold, cfg.hard_label, cfg.temperature)
        loss = loss_x + cfg.lambda_u * loss_u
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_rate": mask.mean()}
        logs["pseudo_acc"] = pseudo_label_accuracy(pseudo, mask, batch.u_y)
        if self.ctx.run.data.open_set is not None:  # the mask rate on seen-class vs open-set samples
            logs.update(seen_unseen_means("mask_rate", mask, batch.u_y))
        return loss, logs


def pseudo_label_accuracy(pseudo: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None):
    """``(correct, counted)`` over masked samples whose hidden label is known (a ratio log)."""
    if hidden is None:
        return (0.0, 0.0)
    known = (mask > 0) & (hidden >= 0)
    return ((pseudo == hidden) & known).sum(), known.sum()


def seen_unseen_means(name: str, values: torch.Tensor, hidden: torch.Tensor | None) -> dict[str, tuple]:
    """``{name_seen: (Σ, n), name_unseen: (Σ, n)}``: ``values`` [N] summed over unlabeled samples of seen
    classes (hidden label >= 0) and over open-set samples (hidden label ``raykd.data.split.UNSEEN``);
    samples of unknown class (-1) count in neither.  Ratio logs, so windows average Σ/n."""
    if hidden is None:
        return {f"{name}_seen": (0.0, 0.0), f"{name}_unseen": (0.0, 0.0)}
    values = values.detach().float()
    seen, unseen = (hidden >= 0).float(), (hidden == UNSEEN).float()
    return {
        f"{name}_seen": ((values * seen).sum(), seen.sum()),
        f"{name}_unseen": ((values * unseen).sum(), unseen.sum()),
    }
