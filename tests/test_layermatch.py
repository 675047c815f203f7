"""LayerMatch (docs/methods.md, `layermatch`): Grad-ReLU's gradient routing (blocked, scaled, equal to
FixMatch at scale 1, sign-gated), the Avg-Clustering memory bank on hand-made tensors, the averaged
targets' mask, and the bank through the training loop (updated, and resumed exactly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raykd.data import data_of
from raykd.data.augment import Augmenter
from raykd.errors import ConfigError
from raykd.methods import METHODS, Batch
from raykd.methods.layermatch import (
    averaged_prediction,
    averaged_targets,
    centre_pull,
    ema_bank_update,
    scale_grad,
    update_feature_centres,
)
from raykd.models import build_model
from raykd.testing import flat_state, tiny_run_config
from raykd.train.context import LocalSession, StepContext
from raykd.train.loop import train_loop

# every unlabeled sample passes the mask, so L_u is not trivially zero on an untrained model
OPEN = {"threshold": 0.0, "avg_threshold": 0.0, "consistency": False}


def make_method(method: str = "layermatch", model=None, **knobs):
    cfg = tiny_run_config(method, method=knobs)
    data = data_of(cfg)
    if model is None:
        torch.manual_seed(0)
        model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    ctx = StepContext(
        run=cfg,
        data=data,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        model=model,
        raw_model=model,
        augmenter=Augmenter(hflip=data.hflip, mean=data.mean, std=data.std),
        generator=torch.Generator(),
    )
    m = METHODS.get(method)(ctx)
    m.setup()
    return m


def batch_of(method, b: int = 8, n: int = 16) -> Batch:
    data = method.ctx.data
    return Batch(
        x=data.labeled.images[:b],
        y=data.labeled.labels[:b],
        idx=torch.arange(b),
        u=data.unlabeled.images[:n],
        u_idx=torch.arange(n),
        u_y=data.unlabeled.labels[:n],
        step=0,
    )


def grads(loss, module):
    """Gradients of ``loss`` w.r.t. (classifier params, backbone params); zeros where unreached."""
    head = list(module.classifier.parameters())
    body = [p for name, p in module.named_parameters() if not name.startswith("classifier.")]
    g = torch.autograd.grad(loss, head + body, allow_unused=True, retain_graph=True)
    g = [torch.zeros_like(p) if x is None else x for p, x in zip(head + body, g, strict=True)]
    return g[: len(head)], g[len(head) :]


def losses(method, seed: int = 1):
    method.ctx.generator.manual_seed(seed)
    return method.losses(batch_of(method))


@pytest.mark.parametrize("avg_mode", ["none", "sample_ema", "center_ema", "ema_model", "feature_center", "soft_avg"])
def test_grad_relu_unlabeled_loss_reaches_backbone_but_not_classifier(avg_mode):
    m = make_method(avg_mode=avg_mode, cls_grad_scale=0.0, **OPEN)
    out = losses(m)
    assert out["mask"].sum() == len(out["mask"]) and out["loss_u"] > 0
    out["loss_u"].backward(retain_graph=True)
    model = m.ctx.raw_model
    for p in model.classifier.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    body = [p.grad for n, p in model.named_parameters() if not n.startswith("classifier.")]
    assert all(g is not None for g in body) and sum(int(torch.count_nonzero(g)) for g in body) > 0
    # in the full loss the classifier's gradient is exactly the supervised loss's
    loss = out["loss_x"] + 2.0 * out["loss_u"]
    assert all(torch.equal(a, b) for a, b in zip(grads(loss, model)[0], grads(out["loss_x"], model)[0], strict=True))


def test_cls_grad_scale_one_is_fixmatch_and_intermediate_scales_the_classifier_only():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    fm = make_method("fixmatch", model=model, threshold=0.165)
    fm.ctx.generator.manual_seed(1)
    loss_fm, _ = fm.train_step(batch_of(fm))
    head_fm, body_fm = grads(loss_fm, model)

    lm = make_method(model=model, avg_mode="none", threshold=0.165, cls_grad_scale=1.0)
    lm.ctx.generator.manual_seed(1)
    loss_lm, logs = lm.train_step(batch_of(lm))
    assert 0.0 < float(logs["mask_rate"]) < 1.0  # a mixed mask: the threshold matters
    assert torch.equal(loss_lm, loss_fm)
    head_lm, body_lm = grads(loss_lm, model)
    for a, b in zip(head_lm + body_lm, head_fm + body_fm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # the unlabeled loss alone: a scale of 0.4 gives 0.4x the classifier gradient, the same backbone one
    full, part = (make_method(model=model, avg_mode="none", threshold=0.165, cls_grad_scale=s) for s in (1.0, 0.4))
    head_1, body_1 = grads(losses(full)["loss_u"], model)
    head_s, body_s = grads(losses(part)["loss_u"], model)
    assert all(torch.count_nonzero(h) > 0 for h in head_1)
    for a, b in zip(head_s, head_1, strict=True):
        torch.testing.assert_close(a, 0.4 * b)
    assert all(torch.equal(a, b) for a, b in zip(body_s, body_1, strict=True))


def test_sign_mode_scales_only_components_that_conflict_with_the_supervised_gradient():
    model = make_method().ctx.raw_model
    plain = make_method(model=model, avg_mode="none", threshold=0.0, cls_grad_scale=1.0)
    gated = make_method(model=model, avg_mode="none", threshold=0.0, cls_grad_scale=0.25, grad_relu_mode="sign")
    out = losses(plain)
    head_u, body_u = grads(out["loss_u"], model)
    head_x, _ = grads(out["loss_x"], model)  # the supervised gradient, by autograd
    head_g, body_g = grads(losses(gated)["loss_u"], model)
    for g_u, g_x, g in zip(head_u, head_x, head_g, strict=True):
        agree = g_u * g_x > 0
        assert 0 < int(agree.sum()) < agree.numel()  # both kinds of component occur
        torch.testing.assert_close(g, torch.where(agree, g_u, 0.25 * g_u))
    assert all(torch.equal(a, b) for a, b in zip(body_g, body_u, strict=True))


def test_scale_grad_keeps_forward_values_bit_for_bit():
    p = torch.randn(5, 3, requires_grad=True)
    for s in (0.0, 0.3, 1.0):
        assert torch.equal(scale_grad(p, s), p)
    (scale_grad(p, 0.3) * torch.arange(15.0).view(5, 3)).sum().backward()
    torch.testing.assert_close(p.grad, 0.3 * torch.arange(15.0).view(5, 3))


def test_memory_bank_update_rule_on_hand_made_tensors():
    bank = torch.full((4, 3), 1 / 3)
    count = torch.zeros(4, dtype=torch.long)
    qa, qb, qc = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.1, 0.1, 0.8])
    # sample 1 twice in one (gathered) global batch: updated twice, in order
    ema_bank_update(bank, count, torch.tensor([1, 3, 1]), torch.stack([qa, qc, qb]), momentum=0.9)
    u = torch.full((3,), 1 / 3)
    torch.testing.assert_close(bank[1], 0.9 * (0.9 * u + 0.1 * qa) + 0.1 * qb)
    torch.testing.assert_close(bank[3], 0.9 * u + 0.1 * qc)
    assert torch.equal(bank[0], u) and torch.equal(bank[2], u)  # untouched rows stay uniform
    assert count.tolist() == [0, 2, 0, 1]

    # debiased: the weighted mean of what was seen; one visit gives the prediction back
    avg = averaged_prediction(bank, count, 0.9, debias=True)
    torch.testing.assert_close(avg[3], qc)
    torch.testing.assert_close(avg[1], (0.9 * 0.1 * qa + 0.1 * qb) / (1 - 0.81))
    assert torch.equal(avg[0], u)  # never updated: the uniform start
    assert torch.equal(averaged_prediction(bank, count, 0.9, debias=False), bank)


def test_averaged_targets_threshold_and_consistency():
    q_avg = torch.tensor([[0.96, 0.02, 0.02], [0.96, 0.02, 0.02], [0.5, 0.4, 0.1], [0.1, 0.05, 0.85]])
    q = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.9, 0.1, 0.0], [0.1, 0.1, 0.8]])
    target, mask, agree = averaged_targets(q, q_avg, threshold=0.85, consistency=True)
    assert target.tolist() == [0, 0, 0, 2]  # the averaged arg-max, not the current one
    assert agree.tolist() == [True, False, True, True]
    assert mask.tolist() == [1.0, 0.0, 0.0, 1.0]  # 2nd: inconsistent; 3rd: under tau_a
    _, mask_any, _ = averaged_targets(q, q_avg, threshold=0.85, consistency=False)
    assert mask_any.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_bank_is_updated_by_training_and_resumes_exactly(tmp_path):
    cfg = tiny_run_config("layermatch", train={"steps": 2, "eval_every": 1}, method={"avg_threshold": 0.3})
    seen = {}

    def grab(key):
        return lambda ctx, method: seen.__setitem__(key, (flat_state(ctx.raw_model), method.state_dict()))

    train_loop(cfg, LocalSession(tmp_path / "a"), tmp_path / "a", on_end=grab("full"))
    _, state = seen["full"]
    per_step = cfg.train.batch_size * cfg.train.uratio
    assert int(state["count"].sum()) == 2 * per_step
    visited = state["count"] > 0
    assert not torch.allclose(state["bank"][visited], torch.full_like(state["bank"][visited], 0.1))
    assert torch.equal(state["bank"][~visited], torch.full_like(state["bank"][~visited], 0.1))

    session = LocalSession(tmp_path / "b")
    train_loop(cfg, session, tmp_path / "b", stop_at=1)
    train_loop(cfg, session, tmp_path / "b", on_end=grab("resumed"))
    weights, resumed = seen["resumed"]
    assert torch.equal(weights, seen["full"][0])
    assert torch.equal(resumed["bank"], state["bank"]) and torch.equal(resumed["count"], state["count"])


def test_unknown_avg_mode_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="method.avg_mode"):
        tiny_run_config("layermatch", method={"avg_mode": "centre"})


# ---------------------------------------------------------------------------------------------
# the readings of Avg-Clustering that keep FixMatch's mask


def test_feature_centre_update_rule_on_hand_made_tensors():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    seen = torch.tensor([True, False, True])
    sums = torch.tensor([[0.0, 2.0], [3.0, 1.0], [0.0, 0.0]])  # class 0: 2 samples; class 1: 1; class 2: none
    counts = torch.tensor([2.0, 1.0, 0.0])
    update_feature_centres(centres, seen, sums, counts, momentum=0.75)
    torch.testing.assert_close(centres[0], torch.tensor([0.75 * 1.0 + 0.25 * 0.0, 0.75 * 0.0 + 0.25 * 1.0]))
    torch.testing.assert_close(centres[1], torch.tensor([3.0, 1.0]))  # first visit: the batch mean itself
    torch.testing.assert_close(centres[2], torch.tensor([5.0, 5.0]))  # not in the batch: untouched
    assert seen.tolist() == [True, True, True]


def test_centre_pull_is_the_masked_normalised_distance_and_moves_only_the_features():
    h = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    centres = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    target, mask = torch.tensor([0, 1, 1]), torch.tensor([1.0, 1.0, 0.0])
    pull = centre_pull(h, centres, target, mask)
    # sample 0 sits on its centre (0); sample 1: |(0,1) - (1,0)|^2 = 2; sample 2 masked; mean over 3
    assert pull.item() == pytest.approx(2.0 / 3.0)
    pull.backward()
    assert h.grad is not None and torch.count_nonzero(h.grad[1]) > 0 and torch.count_nonzero(h.grad[2]) == 0
    assert centres.grad is None  # the centres are targets, not trained


def test_feature_center_keeps_fixmatchs_mask_and_adds_the_pull_term():
    fm = make_method(avg_mode="none", threshold=0.105)
    fc = make_method(avg_mode="feature_center", threshold=0.105)
    out_fm, out_fc = losses(fm), losses(fc)
    assert torch.equal(out_fm["mask"], out_fc["mask"]) and 0 < out_fc["mask"].sum()
    torch.testing.assert_close(out_fm["loss_u"], out_fc["loss_u"])
    assert out_fc["loss_center"] > 0
    assert bool(fc.centre_seen.any()) and set(fc.state_dict()) >= {"feature_centres", "centre_seen"}


def test_soft_avg_is_fixmatchs_mask_with_the_averaged_prediction_as_soft_target():
    """On a fresh bank one visit gives q̄ = q (debiased), so L_u must be FixMatch's mask times the
    soft cross-entropy H(softmax(z_w), softmax(z_s)), computed here from the same views by hand."""
    m = make_method(avg_mode="soft_avg", threshold=0.11, avg_momentum=0.5)
    batch = batch_of(m)
    ctx = m.ctx
    ctx.generator.manual_seed(1)
    out = m.losses(batch)
    ctx.generator.manual_seed(1)  # the same views again
    x_w, u_w, u_s = ctx.weak(batch.x), ctx.weak(batch.u), ctx.strong(batch.u)
    with torch.no_grad():
        logits = m.ctx.raw_model(torch.cat([x_w, u_w, u_s]))
    b, n = batch.x.shape[0], batch.u.shape[0]
    q, z_s = logits[b : b + n].softmax(-1), logits[b + n :]
    mask = (q.max(-1).values >= 0.11).float()
    expected = (-(q * F.log_softmax(z_s, -1)).sum(-1) * mask).mean()
    assert torch.equal(out["mask"], mask) and 0 < mask.sum()
    torch.testing.assert_close(out["loss_u"].detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(m.count[batch.u_idx], torch.ones(n, dtype=torch.long))


def test_memory_bank_closed_form_equals_the_sequential_rule_with_many_repeats():
    """The shape-static update (no host sync) equals applying the rows one by one, in order."""
    g = torch.Generator().manual_seed(0)
    bank = torch.softmax(torch.randn(7, 5, generator=g), 1)
    count = torch.randint(0, 4, (7,), generator=g)
    idx = torch.randint(0, 7, (40,), generator=g)  # every index repeated, some many times
    q = torch.softmax(torch.randn(40, 5, generator=g), 1)
    ref_bank, ref_count = bank.clone(), count.clone()
    for i, row in zip(idx.tolist(), q, strict=True):
        ref_bank[i] = 0.9 * ref_bank[i] + 0.1 * row
        ref_count[i] += 1
    ema_bank_update(bank, count, idx, q, momentum=0.9)
    torch.testing.assert_close(bank, ref_bank, rtol=1e-6, atol=1e-7)
    assert torch.equal(count, ref_count)
    ema_bank_update(bank, count, idx[:0], q[:0], momentum=0.9)  # an empty batch changes nothing
    assert torch.equal(count, ref_count)
