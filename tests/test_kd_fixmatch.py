"""KD-FixMatch (docs/methods.md, `kd_fixmatch`): trusted-subset selection on constructed embeddings,
determinism, the cached table, SCE, and Heuristic 1 in a train step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raykd.errors import ConfigError
from raykd.methods import kd_fixmatch as kd_fixmatch_mod
from raykd.methods.kd_fixmatch import high_confidence, map_clusters, sce_loss, trusted_subset
from raykd.testing import flat_state, tiny_run_config, tiny_teacher
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


def test_train_step_applies_heuristic_1_and_the_table_is_cached(tmp_path, monkeypatch):
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
    monkeypatch.setattr(kd_fixmatch_mod, "weak_strong_views", lambda ctx, model, batch: (torch.zeros(1, 10), z_w, z_s))
    batch = type("B", (), {"y": torch.tensor([0]), "u_idx": torch.tensor([0, 1, 2]), "u_y": torch.tensor([2, 7, 5])})
    loss, logs = m.train_step(batch)
    log_p = F.log_softmax(z_s.detach(), -1)
    expected_u = (-log_p[0, 2] - log_p[1, 7]) / 3  # sample 2 masked, normalised by all three
    assert logs["loss_u"].item() == pytest.approx(expected_u.item())
    assert logs["mask_rate"].item() == pytest.approx(2 / 3)
    correct, counted = logs["pseudo_acc"]
    assert (int(correct), int(counted)) == (2, 2)

    # the separate formulation: plain FixMatch L_u (sample 0 only passes tau) + lambda_t × the mean
    # Heuristic-1 loss over the batch's two trusted samples
    m.cfg = m.cfg.model_copy(update={"formulation": "separate", "lambda_t": 2.0})
    loss, logs = m.train_step(batch)
    assert logs["loss_u"].item() == pytest.approx((-log_p[0, 2] / 3).item())
    assert logs["loss_t"].item() == pytest.approx(((-log_p[0, 2] - log_p[1, 7]) / 2).item())
    loss_x = F.cross_entropy(torch.zeros(1, 10), torch.tensor([0]))
    assert loss.item() == pytest.approx((loss_x + logs["loss_u"] + 2.0 * logs["loss_t"]).item())


def test_per_class_high_confidence_keeps_the_top_fraction_of_each_predicted_class():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.45, 0.55]])
    keep = high_confidence(probs, tau_hc=0.99, mode="per_class", fraction=0.5)
    # class 0: 0.9, 0.7, 0.6 -> top round(1.5)=2: samples 0, 2; class 1: 0.8, 0.55 -> top 1: sample 3
    assert keep.tolist() == [True, False, True, True, False]
    assert not high_confidence(probs, tau_hc=0.99).any()


def test_dec_and_hungarian_recover_the_planted_blobs():
    probs, emb, pred = constructed()
    for options in ({"clustering": "dec"}, {"cluster_map": "hungarian"}):
        trusted, _, _ = trusted_subset(probs, emb, tau_hc=0.95, num_clusters=3, purity_min=0.0, seed=0, **options)
        expected = np.ones(30, dtype=bool)
        expected[[3, 12]] = False
        assert np.array_equal(trusted, expected), options


def test_hungarian_is_one_to_one_where_majority_is_not():
    clusters = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 0, 0, 1])  # both clusters' majority is class 0
    majority, _ = map_clusters(clusters, pred, 2, 2, "majority")
    hungarian, purity = map_clusters(clusters, pred, 2, 2, "hungarian")
    assert majority.tolist() == [0, 0]
    assert sorted(hungarian.tolist()) == [0, 1] and hungarian[0] == 0
    assert purity.tolist() == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="one cluster per class"):
        map_clusters(clusters, pred, 2, 3, "hungarian")


def test_hungarian_with_several_clusters_per_class_is_rejected_in_the_config():
    with pytest.raises(ConfigError, match="method.cluster_map"):
        tiny_run_config("kd_fixmatch", method={"cluster_map": "hungarian", "cluster_mult": 2})


def test_inner_init_outer_weights_starts_the_student_and_its_ema_from_the_teacher(tmp_path):
    cfg = tiny_run_config("kd_fixmatch", method={"inner_init": "outer_weights"}, train={"steps": 1, "eval_every": 1})
    teacher_dir = tiny_teacher(cfg, tmp_path)
    seen = {}

    def grab(ctx, method):
        seen["teacher"] = flat_state(ctx.teacher)

    class Probe(LocalSession):
        def prepare_model(self, model):  # the loop's student, before any step
            seen["student"] = model
            return model

    train_loop(cfg, Probe(tmp_path / "run"), tmp_path / "run", teacher_dir=teacher_dir, on_end=grab)
    # one SGD step moved the student a little from the teacher; a scratch start is far away
    gap = (flat_state(seen["student"]) - seen["teacher"]).abs().max().item()
    scratch = tiny_run_config("kd_fixmatch", train={"steps": 1, "eval_every": 1})
    train_loop(scratch, Probe(tmp_path / "s"), tmp_path / "s", teacher_dir=teacher_dir)
    assert gap < 0.1 < (flat_state(seen["student"]) - seen["teacher"]).abs().max().item()


def test_inner_init_outer_weights_needs_the_same_architecture(tmp_path):
    cfg = tiny_run_config("kd_fixmatch", method={"inner_init": "outer_weights"}, model={"width": 4})
    with pytest.raises(ConfigError, match="method.inner_init"):
        train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run", teacher_dir=tiny_teacher(cfg, tmp_path))
