"""Helpers several methods share: FixMatch's unlabeled loss and views, Hinton's KD loss, and the
ratio logs for pseudo-label accuracy and seen-vs-unseen means.  Methods import these from here, never
from each other's modules."""

from __future__ import annotations

from raykd.lazy import F, nn, torch
from raykd.methods.base import Batch, MethodContext


def weak_strong_views(ctx: MethodContext, model: nn.Module, batch: Batch):
    """Logits of weak labeled, weak unlabeled and strong unlabeled views from one forward pass of
    ``model`` (one concatenated batch, so BN statistics are shared as in FixMatch)."""
    b, n = batch.x.shape[0], batch.u.shape[0]
    inputs = torch.cat([ctx.weak(batch.x), ctx.weak(batch.u), ctx.strong(batch.u)])
    with ctx.autocast():
        logits = model(inputs)
    return logits[:b], logits[b : b + n], logits[b + n :]


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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` averaged over the batch (the teacher side is detached)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


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
    from raykd.data.split import UNSEEN  # here, not at import: validating a config never imports torch

    seen, unseen = (hidden >= 0).float(), (hidden == UNSEEN).float()
    return {
        f"{name}_seen": ((values * seen).sum(), seen.sum()),
        f"{name}_unseen": ((values * unseen).sum(), unseen.sum()),
    }


def seen_unseen_names(*names: str) -> tuple[str, ...]:
    """The log names :func:`seen_unseen_means` makes for each of ``names``."""
    return tuple(f"{n}_{part}" for n in names for part in ("seen", "unseen"))
