"""SLaM (docs/methods.md, `slam`): the mixing formula on hand-made tensors (both
normalisations), α/k estimation on constructed validation sets with known answers, the per-sample
table (cached, constant per sample index across steps), and the validation split kept out of training.
Rank agreement of α, k and the top-k mask is checked by the registry's 2-rank test (tests/test_methods.py)
through ``SLaM.state_dict``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raykd.config import parse_run_config
from raykd.data.split import load_dataset, ssl_split
from raykd.errors import ConfigError
from raykd.methods import slam as slam_mod
from raykd.methods.slam import (
    SLaM,
    confidence,
    estimate_alpha_k,
    label_rank,
    slam_loss,
    slam_mix,
    topk_mask,
)
from raykd.testing import tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop

# ------------------------------------------------------------------------------------------ the loss

F_HAND = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
ALPHA = torch.tensor([0.6, 0.25])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
K = torch.tensor([2, 3])


def test_unnormalised_mix_matches_the_formula_and_is_not_renormalised():
    # row 0: 0.6*f + 0.4*(1-f)*[1,1,0] = [0.3+0.2, 0.18+0.28, 0.12+0] = [0.5, 0.46, 0.12]
    # row 1: 0.25*f + 0.75*(1-f) = [0.05+0.6, 0.05+0.6, 0.15+0.3] = [0.65, 0.65, 0.45]
    mix = slam_mix(F_HAND, ALPHA, MASK, K, normalize_k=False)
    expected = torch.tensor([[0.5, 0.46, 0.12], [0.65, 0.65, 0.45]])
    assert torch.allclose(mix, expected, atol=1e-6)
    assert mix.sum(1).tolist() == pytest.approx([1.08, 1.75])  # not a distribution, and left so


def test_normalize_k_divides_the_wrong_label_term_by_k_minus_one():
    mix = slam_mix(F_HAND, ALPHA, MASK, K, normalize_k=True)
    # row 0: k = 2 -> divided by 1, unchanged; row 1: k = 3 -> 0.75*(1-f)/2 = [0.3, 0.3, 0.15]
    expected = torch.tensor([[0.5, 0.46, 0.12], [0.35, 0.35, 0.30]])
    assert torch.allclose(mix, expected, atol=1e-6)


def test_slam_loss_value_and_gradients_reach_the_student_only():
    logits = F_HAND.log().clone().requires_grad_(True)  # softmax(log f) = f
    ys = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]], requires_grad=True)
    alpha = ALPHA.clone().requires_grad_(True)
    loss = slam_loss(logits, ys, alpha, MASK, K, normalize_k=False)
    by_hand = -(
        0.7 * math.log(0.5 + 1e-8) + 0.2 * math.log(0.46 + 1e-8) + 0.1 * math.log(0.12 + 1e-8) + math.log(0.65 + 1e-8)
    )
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert ys.grad is None and alpha.grad is None


def test_with_alpha_one_the_loss_is_plain_cross_entropy_to_the_teacher():
    logits = torch.randn(4, 5)
    ys = torch.softmax(torch.randn(4, 5), -1)
    mask = torch.ones(4, 5, dtype=torch.bool)
    got = slam_loss(logits, ys, torch.ones(4), mask, torch.full((4,), 3), normalize_k=False)
    assert got.item() == pytest.approx(-(ys * torch.log_softmax(logits, -1)).sum(1).mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ estimation


def test_statistics_ranks_and_topk_mask_on_hand_made_probabilities():
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]])
    assert confidence(probs, "margin") == pytest.approx([0.3, 0.1])
    assert confidence(probs, "maxprob") == pytest.approx([0.6, 0.5])
    assert label_rank(probs, np.array([2, 2])).tolist() == [3, 2]
    assert topk_mask(probs, np.array([2, 1])).tolist() == [[True, True, False], [False, True, False]]


def constructed_validation():
    """Ten validation points at statistics 0.0 .. 0.9 (given in shuffled order): the teacher is wrong on
    the five lowest and right on the five highest; the true label's rank in the teacher's ordering is
    planted to give known top-k coverages."""
    stat = np.arange(10) / 10
    rank = np.array([2, 3, 3, 5, 4, 1, 1, 1, 1, 1])
    perm = np.random.default_rng(0).permutation(10)
    return stat[perm], rank[perm] == 1, rank[perm]


def test_alpha_and_k_from_nearest_validation_points_have_the_known_answer():
    stat, correct, rank = constructed_validation()
    pool = np.array([0.0, 0.46, 0.9])
    alpha, k = estimate_alpha_k(stat, correct, rank, pool, k_nn=4, rho=0.75, k_max=5, alpha_min=0.1)
    # 0.0 -> {0.0,0.1,0.2,0.3}: 0 right (clipped to 0.1), ranks 2,3,3,5: top-3 covers 3/4 -> k = 3
    # 0.46 -> {0.3,0.4,0.5,0.6}: 2 right, ranks 5,4,1,1: top-2 and top-3 cover 2/4, top-4 3/4 -> k = 4
    # 0.9 -> {0.6,0.7,0.8,0.9}: all right, top-2 covers all -> k = 2
    assert alpha == pytest.approx([0.1, 0.5, 1.0])
    assert k.tolist() == [3, 4, 2]
    # nobody reaches rho = 1 at 0.0 within k_max = 4 -> k_max
    _, k = estimate_alpha_k(stat, correct, rank, pool, k_nn=4, rho=1.0, k_max=4, alpha_min=0.1)
    assert k.tolist() == [4, 4, 2]
    # global rule: over all of V top-2 covers 6/10 and top-3 8/10 -> k = 3 everywhere
    _, k = estimate_alpha_k(stat, correct, rank, pool, k_nn=4, rho=0.75, k_max=5, alpha_min=0.1, k_rule="global")
    assert k.tolist() == [3, 3, 3]
    # k_nn beyond |V| uses all of V: alpha is the teacher's validation accuracy
    alpha, _ = estimate_alpha_k(stat, correct, rank, pool, k_nn=500, rho=0.75, k_max=5, alpha_min=0.1)
    assert alpha == pytest.approx([0.5, 0.5, 0.5])


def test_isotonic_smoothing_makes_alpha_monotone_in_the_statistic():
    stat = np.array([0.1, 0.2, 0.3, 0.4])
    correct = np.array([False, True, False, True])
    rank = np.where(correct, 1, 2)
    raw, _ = estimate_alpha_k(stat, correct, rank, stat, k_nn=1, rho=0.9, k_max=3, alpha_min=0.0)
    assert raw.tolist() == [0.0, 1.0, 0.0, 1.0]
    smooth, _ = estimate_alpha_k(stat, correct, rank, stat, k_nn=1, rho=0.9, k_max=3, alpha_min=0.0, isotonic=True)
    assert smooth == pytest.approx([0.0, 0.5, 0.5, 1.0])  # pool-adjacent-violators average of the middle pair


def test_alpha_recovers_a_known_correctness_curve_on_a_large_validation_set():
    # P(teacher right | margin m) = m: the kNN estimate must follow that line
    rng = np.random.default_rng(0)
    m = rng.random(5000)
    correct = rng.random(5000) < m
    rank = np.where(correct, 1, 2)
    pool = np.linspace(0.1, 0.9, 9)
    alpha, _ = estimate_alpha_k(m, correct, rank, pool, k_nn=250, rho=0.9, k_max=3, alpha_min=0.0)
    assert np.abs(alpha - pool).max() < 0.06


# ------------------------------------------------------------------------------------------ config rules


def test_slam_needs_a_validation_split_and_a_teacher_that_held_it_out():
    with pytest.raises(ConfigError) as info:
        tiny_run_config("slam", data={"val_per_class": 0})
    assert info.value.field == "data.val_per_class"
    raw = tiny_run_config("slam").model_dump(mode="json", exclude={"provenance"})
    raw["teacher"]["run"]["data"]["val_per_class"] = 0  # the teacher would train on V's labels
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    assert info.value.field == "teacher.run.data"
    raw["teacher"]["run"]["data"].update(val_per_class=2, seed=1)  # another split: V not held out
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    assert info.value.field == "teacher.run.data"
    raw["teacher"]["run"]["data"].update(val_per_class=5, seed=0)  # a superset of V held out: fine
    assert parse_run_config(raw).method.name == "slam"


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("slam-teacher")
    return tiny_teacher(tiny_run_config("slam"), root)


def test_table_is_cached_and_constant_per_sample_index_across_steps(teacher, tmp_path, monkeypatch):
    cfg = tiny_run_config("slam", train={"steps": 6, "eval_every": 3}, method={"k_nn": 5, "rho": 0.8})
    used, seen = [], {}
    real_loss, real_step = slam_mod.slam_loss, SLaM.train_step

    def recording_loss(logits, ys, alpha, mask, k, normalize_k=False):
        used[-1].update(alpha=alpha.clone(), mask=mask.clone(), k=k.clone(), ys=ys.clone())
        return real_loss(logits, ys, alpha, mask, k, normalize_k)

    def recording_step(self, batch):
        used.append({"idx": batch.u_idx.clone()})
        return real_step(self, batch)

    monkeypatch.setattr(slam_mod, "slam_loss", recording_loss)
    monkeypatch.setattr(SLaM, "train_step", recording_step)
    train_loop(cfg, LocalSession(tmp_path / "a"), tmp_path / "a", teacher_dir=teacher,
               on_end=lambda ctx, m: seen.update(state=m.state_dict()))  # fmt: skip
    (path,) = teacher.glob("slam-*.pt")
    assert path.parent == teacher and path.exists()  # cached beside the teacher
    table = torch.load(path, weights_only=True)
    assert len(used) == 6
    for step in used:  # what every step used for its samples is the table's row for that index
        i = step["idx"]
        assert torch.equal(step["alpha"], table["alpha"][i]) and torch.equal(step["k"], table["k"][i])
        assert torch.equal(step["mask"], table["mask"][i]) and torch.equal(step["ys"], table["probs"][i])
    assert torch.equal(seen["state"]["alpha"], table["alpha"]) and torch.equal(seen["state"]["k"], table["k"])
    assert torch.equal(seen["state"]["topk_mask"], table["mask"])
    k = table["k"]
    assert ((k >= 2) & (k <= 5)).all() and torch.equal(table["mask"].sum(1), k)  # the mask holds k(x) classes
    assert (table["alpha"] >= 0.1 - 1e-6).all() and (table["alpha"] <= 1.0).all()  # alpha_min = 1/C

    stamp = path.stat().st_mtime_ns
    monkeypatch.undo()
    train_loop(cfg, LocalSession(tmp_path / "b"), tmp_path / "b", teacher_dir=teacher,
               on_end=lambda ctx, m: seen.update(again=m.state_dict()))  # fmt: skip
    assert path.stat().st_mtime_ns == stamp  # loaded, not recomputed
    assert all(torch.equal(seen["again"][key], seen["state"][key]) for key in seen["state"])


def test_validation_split_is_never_seen_in_training(teacher, tmp_path, monkeypatch):
    cfg = tiny_run_config("slam", train={"steps": 6, "eval_every": 6})
    batches, student_calls = [], {"on_train_start": 0}
    real_step, real_before = SLaM.train_step, SLaM.on_train_start

    def recording_step(self, batch):
        batches.append((batch.idx.clone(), batch.u_idx.clone(), batch.x.clone(), batch.u.clone()))
        return real_step(self, batch)

    def watched_before(self):  # the validation images reach the teacher only, never the student
        hook = self.ctx.raw_model.register_forward_hook(lambda *a: student_calls.__setitem__("on_train_start", 1))
        try:
            real_before(self)
        finally:
            hook.remove()

    monkeypatch.setattr(SLaM, "train_step", recording_step)
    monkeypatch.setattr(SLaM, "on_train_start", watched_before)
    train_loop(cfg, LocalSession(tmp_path), tmp_path, teacher_dir=teacher)
    assert student_calls["on_train_start"] == 0

    d = cfg.data
    bundle = load_dataset(d.name, d.root)
    split = ssl_split(bundle.train.labels, bundle.num_classes, d.labels_per_class, d.val_per_class, d.seed)
    val = set(split.val.tolist())
    assert len(val) == 20
    val_bytes = {bundle.train.images[i].numpy().tobytes() for i in val}
    other_bytes = {bundle.train.images[i].numpy().tobytes() for i in range(len(bundle.train)) if i not in val}
    only_val = val_bytes - other_bytes  # validation images with no duplicate elsewhere in the train set
    for idx, u_idx, x, u in batches:
        assert not val & set(split.labeled[idx].tolist())
        assert not val & set(split.unlabeled[u_idx].tolist())
        assert not only_val & {img.cpu().numpy().tobytes() for img in torch.cat([x, u])}


def test_a_checkpoint_teacher_that_trained_on_the_validation_split_is_refused(teacher, tmp_path):
    # the teacher held out 2 per class; a student asking for 3 per class would estimate alpha partly on
    # samples the teacher was trained on
    raw = tiny_run_config("slam").model_dump(mode="json", exclude={"provenance"})
    raw["data"]["val_per_class"] = 3
    raw["teacher"] = {"checkpoint": str(teacher)}
    with pytest.raises(ConfigError) as info:
        train_loop(parse_run_config(raw), LocalSession(tmp_path), tmp_path, teacher_dir=teacher)
    assert info.value.field == "teacher.checkpoint"
