"""KD-FixMatch (METHODS.md §4, §9 invariant 6): trusted-subset selection on constructed embeddings,
determinism, the cached table, SCE, and Heuristic 1 in a train step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raykd.methods.kd_fixmatch import sce_loss, trusted_subset
from raykd.testing import tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop


def constructed(rng_seed: int = 0):
    """Three tight, far-apart blobs of 10 points; the outer network predicts the blob's class for all
    but a few planted samples."""
    rng = np.random.default_rng(rng_seed)
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    emb = np.concatenate([c + 0.1 * rng.standard_normal((10, 2)) for c in centres])
    truth = np.repeat(np.arange(3), 10)
    pred = truth.copy()
    pred[3] = 1  # predicted against its cluster's majority: fails the agreement check
    conf = np.full(30, 0.99)
    conf[12] = 0.6  # agrees with its cluster, but not confident
    probs = np.full((30, 3), 0.0)
    probs[np.arange(30), pred] = conf
    for i in range(30):  # spread the rest of the mass over the other classes
        others = [c for c in range(3) if c != pred[i]]
        probs[i, others] = (1 - conf[i]) / 2
    return probs, emb, pred


def test_trusted_subset_is_high_confidence_and_cluster_agreement():
    probs, emb, pred = constructed()
    trusted, label, info = trusted_subset(probs, emb, tau_hc=0.95, num_clusters=3, purity_min=0.0, seed=0)
    expected = np.ones(30, dtype=bool)
    expected[[3, 12]] = False
    assert np.array_equal(trusted, expected)
    assert np.array_equal(label, pred)
    assert info["trusted_rate"] == pytest.approx(28 / 30)
    assert info["hc_rate"] == pytest.approx(29 / 30) and info["agree_rate"] == pytest.approx(29 / 30)


def test_purity_filter_drops_mixed_clusters():
    probs, emb, pred = constructed()
    # cluster of class 0 holds one class-1 prediction: purity 0.9; a 0.95 floor drops the whole cluster
    trusted, _, _ = trusted_subset(probs, emb, tau_hc=0.95, num_clusters=3, purity_min=0.95, seed=0)
    assert not trusted[:10].any() and trusted[10:].sum() == 19


def test_trusted_subset_is_deterministic_by_seed():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((200, 8))
    probs = rng.dirichlet(np.ones(5) * 0.3, size=200)
    a = trusted_subset(probs, emb, 0.5, 7, 0.0, seed=3)
    b = trusted_subset(probs, emb, 0.5, 7, 0.0, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_sce_is_ce_plus_clipped_reverse_ce():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 2])
    log_p = F.log_softmax(logits, -1)
    p_t = log_p.exp()[torch.arange(2), target]
    expected = 0.5 * F.nll_loss(log_p, target, reduction="none") + 0.3 * 4.0 * (1 - p_t)
    assert torch.allclose(sce_loss(log_p, target, a=0.5, b=0.3), expected)


def test_train_step_applies_heuristic_1_and_the_table_is_cached(tmp_path):
    cfg = tiny_run_config("kd_fixmatch", train={"steps": 2, "eval_every": 2})
    teacher_dir = tiny_teacher(cfg, tmp_path)
    seen = {}

    def grab(ctx, method):
        seen["method"], seen["ctx"] = method, ctx

    train_loop(cfg, LocalSession(tmp_path / "a"), tmp_path / "a", teacher_dir=teacher_dir, on_end=grab)
    m = seen["method"]
    tables = list(teacher_dir.glob("trusted-*.pt"))
    assert len(tables) == 1
    stamp = tables[0].stat().st_mtime_ns
    train_loop(cfg, LocalSession(tmp_path / "b"), tmp_path / "b", teacher_dir=teacher_dir)
    assert tables[0].stat().st_mtime_ns == stamp  # the second run loaded it, did not recompute

    # Heuristic 1 on a hand-made batch: sample 0 trusted + confident inner -> inner label;
    # sample 1 trusted + unsure inner -> trusted label, counted; sample 2 untrusted + unsure -> masked out
    n = len(m.trusted)
    m.trusted = torch.zeros(n, dtype=torch.bool)
    m.trusted_label = torch.zeros(n, dtype=torch.long)
    m.trusted[[0, 1]] = True
    m.trusted_label[[0, 1]] = 7
    z_w = torch.full((3, 10), -10.0)
    z_w[0, 2] = 10.0  # confident: class 2
    z_w[1] = 0.0  # unsure
    z_w[2] = 0.0
    z_s = torch.zeros(3, 10, requires_grad=True)
    m.forward_views = lambda batch: (torch.zeros(1, 10), z_w, z_s)
    batch = type("B", (), {"y": torch.tensor([0]), "u_idx": torch.tensor([0, 1, 2]), "u_y": torch.tensor([2, 7, 5])})
    loss, logs = m.train_step(batch)
    log_p = F.log_softmax(z_s.detach(), -1)
    expected_u = (-log_p[0, 2] - log_p[1, 7]) / 3  # sample 2 masked, normalised by all three
    assert logs["loss_u"].item() == pytest.approx(expected_u.item())
    assert logs["mask_rate"].item() == pytest.approx(2 / 3)
    correct, counted = logs["pseudo_acc"]
    assert (int(correct), int(counted)) == (2, 2)
