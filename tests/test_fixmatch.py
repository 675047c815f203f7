"""FixMatch's unlabeled loss on hand-made logits (docs/methods.md, `fixmatch`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raykd.methods.fixmatch import fixmatch_unsup_loss, pseudo_label_accuracy


def logits_with_top_prob(p: float, classes: int = 3, top: int = 0) -> torch.Tensor:
    """Logits whose softmax puts probability ``p`` on ``top`` and the rest evenly on the others."""
    rest = (1.0 - p) / (classes - 1)
    probs = torch.full((classes,), rest)
    probs[top] = p
    return probs.log()


def test_mask_is_max_prob_at_or_above_threshold():
    z_w = torch.stack([logits_with_top_prob(0.97), logits_with_top_prob(0.5), logits_with_top_prob(0.9, top=2)])
    z_s = torch.zeros(3, 3)
    tau = float(z_w[2].softmax(-1).max())  # exactly the third sample's confidence
    _, mask, pseudo = fixmatch_unsup_loss(z_w, z_s, threshold=tau)
    assert mask.tolist() == [1.0, 0.0, 1.0]  # equal to tau counts
    assert pseudo.tolist() == [0, 0, 2]
    above = torch.nextafter(torch.tensor(tau), torch.tensor(1.0)).item()  # the next float32 above tau
    _, mask_above, _ = fixmatch_unsup_loss(z_w, z_s, threshold=above)
    assert mask_above.tolist() == [1.0, 0.0, 0.0]


def test_loss_is_normalised_by_all_unlabeled_samples_not_the_masked_ones():
    z_w = torch.stack([logits_with_top_prob(0.99, top=1), logits_with_top_prob(0.4), logits_with_top_prob(0.4)])
    z_s = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    loss_u, mask, _ = fixmatch_unsup_loss(z_w, z_s, threshold=0.95)
    ce_first = -F.log_softmax(z_s[0], -1)[1]
    assert mask.mean().item() == pytest.approx(1 / 3)
    assert loss_u.item() == pytest.approx(ce_first.item() / 3)  # divided by mu*B = 3, not by 1


def test_pseudo_label_path_is_detached_and_only_masked_rows_get_gradients():
    z_w = torch.stack([logits_with_top_prob(0.99), logits_with_top_prob(0.4)]).requires_grad_()
    z_s = torch.randn(2, 3, requires_grad=True)
    loss_u, _, _ = fixmatch_unsup_loss(z_w, z_s, threshold=0.95)
    loss_u.backward()
    assert z_w.grad is None
    assert z_s.grad[0].abs().sum() > 0
    assert torch.equal(z_s.grad[1], torch.zeros(3))


def test_soft_labels_use_the_sharpened_weak_distribution():
    z_w = torch.tensor([[2.0, 1.0, 0.0]])
    z_s = torch.tensor([[0.5, -0.5, 1.0]])
    loss_u, mask, _ = fixmatch_unsup_loss(z_w, z_s, threshold=0.0, hard_label=False, temperature=0.5)
    target = (z_w / 0.5).softmax(-1)
    expected = -(target * F.log_softmax(z_s, -1)).sum()
    assert mask.item() == 1.0
    assert loss_u.item() == pytest.approx(expected.item())


def test_pseudo_label_accuracy_counts_masked_known_labels_only():
    pseudo = torch.tensor([0, 1, 2, 3])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    hidden = torch.tensor([0, 2, 2, -1])  # last one unknown: not counted
    correct, counted = pseudo_label_accuracy(pseudo, mask, hidden)
    assert (int(correct), int(counted)) == (1, 2)
