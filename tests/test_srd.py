"""SRD (docs/methods.md, `srd`): cross-network logits go through the frozen teacher's pooling and
classifier; gradients reach the connector and the student, never the teacher; the distance compares
each image with its OWN teacher logits; different architectures are bridged by the connector."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raykd.config import parse_run_config
from raykd.data.split import UNSEEN
from raykd.errors import ConfigError
from raykd.methods.base import Batch
from raykd.methods.srd import CONNECTORS, srd_distance, teacher_head
from raykd.models.connector import KINDS, Connector
from raykd.testing import flat_state, tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop
from raykd.train.runfolder import STATE_FILE as CHECKPOINT_FILE


def test_srd_distances_on_hand_made_logits():
    z_hat = torch.tensor([[1.0, 0.0, -1.0], [2.0, 2.0, 0.0]])
    z_t = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    assert srd_distance(z_hat, z_t, "mse", 4.0).tolist() == pytest.approx([(1 + 0 + 4) / 3, 4 / 3])
    assert srd_distance(z_hat, z_t, "l1", 4.0).tolist() == pytest.approx([(1 + 0 + 2) / 3, 2 / 3])
    t = 2.0
    expected = []
    for row_h, row_t in zip(z_hat.tolist(), z_t.tolist(), strict=True):
        p_h = [math.exp(v / t) / sum(math.exp(u / t) for u in row_h) for v in row_h]
        p_t = [math.exp(v / t) / sum(math.exp(u / t) for u in row_t) for v in row_t]
        expected.append(t * t * sum(pt * math.log(pt / ph) for pt, ph in zip(p_t, p_h, strict=True)))
    assert srd_distance(z_hat, z_t, "kl", t).tolist() == pytest.approx(expected, rel=1e-5)
    assert srd_distance(z_t, z_t, "kl", 3.0).abs().max() < 1e-6


def test_connector_shapes_and_the_teacher_head_is_pool_plus_classifier():
    fmap = torch.randn(4, 8, 5, 5)
    assert CONNECTORS == KINDS  # the config's choices are what the module builds
    for kind in KINDS:
        out = Connector(8, 16, kind)(fmap)
        assert out.shape[:2] == (4, 16)
    assert torch.all(Connector(8, 16)(fmap) >= 0)  # BN + ReLU
    teacher = nn.Module()
    teacher.classifier = nn.Linear(16, 3)
    maps = torch.randn(2, 16, 3, 3)
    assert torch.allclose(teacher_head(teacher, maps), teacher.classifier(maps.mean(dim=(2, 3))))


def srd_run(tmp_path, open_set=None, **method):
    """Train SRD for one step in-process and return (ctx, method) for hand-made batches."""
    raw = tiny_run_config("srd", method=method, train={"steps": 1, "eval_every": 1}).model_dump(mode="json")
    if open_set is not None:
        raw["data"]["open_set"] = raw["teacher"]["run"]["data"]["open_set"] = open_set
    cfg = parse_run_config(raw)
    seen = {}
    train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run", teacher_dir=tiny_teacher(cfg, tmp_path),
               on_end=lambda ctx, m: seen.update(ctx=ctx, method=m))  # fmt: skip
    ctx, m = seen["ctx"], seen["method"]
    ctx.weak = ctx.plain  # no augmentation randomness: the test recomputes the same views
    return ctx, m


def hand_batch(ctx, b=6, n=12, open_from=None):
    data = ctx.data
    u_idx = torch.arange(n) * 7  # unlabeled images other than the labeled ones
    u_y = data.unlabeled.labels[u_idx].clone()
    if open_from is not None:
        u_y[open_from:] = UNSEEN
    return Batch(x=data.labeled.images[:b], y=data.labeled.labels[:b], idx=torch.arange(b),
                 u=data.unlabeled.images[u_idx], u_idx=u_idx, u_y=u_y, step=0)  # fmt: skip


def test_cross_logits_go_through_the_teacher_classifier_and_only_connector_and_student_get_gradients(tmp_path):
    ctx, m = srd_run(tmp_path)
    teacher, student, connector = ctx.teacher, ctx.raw_model, m.connector
    batch = hand_batch(ctx)
    views = ctx.plain(torch.cat([batch.x, batch.u]))

    terms = m.terms(batch)
    expected = teacher.classifier(teacher.pool(connector(student.feature_map(views))))
    assert torch.allclose(terms["z_hat"], expected, atol=1e-5)
    assert torch.allclose(terms["z_t"], teacher(views), atol=1e-5)  # the teacher's own logits

    loss, logs = m.train_step(batch)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen: nothing accumulates
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

    for p in [*student.parameters(), *connector.parameters()]:
        p.grad = None
    m.terms(batch)["loss_srd"].backward()  # the SRD term alone
    assert all(p.grad is None for p in student.classifier.parameters())  # the student's head learns from CE only
    assert student.blocks[0][0].weight.grad.abs().sum() > 0 and connector.proj.weight.grad.abs().sum() > 0

    with torch.no_grad():  # a constant teacher classifier makes every cross-network logit that constant
        teacher.classifier.weight.zero_()
        teacher.classifier.bias.fill_(3.0)
    assert torch.allclose(m.terms(batch)["z_hat"], torch.full_like(expected, 3.0))


def test_the_distance_uses_the_same_images_teacher_logits_not_the_labeled_batchs(tmp_path):
    ctx, m = srd_run(tmp_path)
    batch = hand_batch(ctx, b=6, n=12)
    with torch.no_grad():
        terms = m.terms(batch)
        z_t_same = ctx.teacher(ctx.plain(torch.cat([batch.x, batch.u])))
    z_hat, b = terms["z_hat"], batch.x.shape[0]
    right = F.mse_loss(z_hat, z_t_same)
    # the reference code's slip: the unlabeled branch against the LABELED batch's teacher logits
    slip = torch.cat([srd_distance(z_hat[:b], z_t_same[:b], "mse", 4.0),
                      srd_distance(z_hat[b:], z_t_same[:b].repeat(2, 1), "mse", 4.0)]).mean()  # fmt: skip
    assert float(terms["loss_srd"]) == pytest.approx(float(right), rel=1e-5)
    assert abs(float(slip) - float(right)) > 1e-3 * float(right)
    _, logs = m.train_step(batch)
    assert float(logs["loss_srd"]) == pytest.approx(float(right), rel=1e-5)


def test_total_loss_weights_and_seen_unseen_logs(tmp_path):
    open_set = {"unseen_classes": [9]}
    ctx, m = srd_run(tmp_path, open_set, beta=2.0, w_feat=0.5, gamma_ce=0.3, alpha_kd=0.7, distance="l1")
    batch = hand_batch(ctx, b=4, n=8, open_from=5)
    with torch.no_grad():
        ctx.raw_model.eval()  # BN in eval mode: two passes give identical terms
        m.connector.eval()
        t = m.terms(batch)
        loss, logs = m.train_step(batch)
    expected = 0.3 * t["loss_x"] + 2.0 * (t["loss_srd"] + 0.5 * t["loss_feat"]) + 0.7 * t["loss_kd"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    num, den = logs["unseen_rate"]
    assert (float(num), float(den)) == (3.0, 8.0)
    dist_u = t["dist"][4:]
    assert float(logs["srd_unseen"][0]) == pytest.approx(float(dist_u[5:].sum()), rel=1e-5)
    assert float(logs["srd_unseen"][1]) == 3.0 and float(logs["srd_seen"][1]) == 5.0
    _, closed_logs = srd_run(tmp_path / "closed")[1].train_step(batch)
    assert "srd_unseen" not in closed_logs and "unseen_rate" not in closed_logs  # closed-set runs: no split


def test_teacher_unchanged_connector_and_student_trained_over_steps(tmp_path):
    cfg = tiny_run_config("srd", train={"steps": 3, "eval_every": 1})
    teacher_dir = tiny_teacher(cfg, tmp_path)
    from raykd.train.teacher import load_teacher

    before = flat_state(load_teacher(teacher_dir, torch.device("cpu")))
    seen = {}
    session = LocalSession(tmp_path / "run", keep=3)
    train_loop(cfg, session, tmp_path / "run", teacher_dir=teacher_dir, on_end=lambda ctx, m: seen.update(ctx=ctx))
    assert torch.equal(flat_state(seen["ctx"].teacher), before)
    steps = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    first, last = (torch.load(s / CHECKPOINT_FILE, weights_only=True) for s in (steps[0], steps[-1]))
    w0, w1 = first["extras"]["connector"]["proj.weight"], last["extras"]["connector"]["proj.weight"]
    assert not torch.equal(w0, w1)  # the connector is optimised and checkpointed by the loop
    assert not torch.equal(first["model"]["blocks.0.0.weight"], last["model"]["blocks.0.0.weight"])


class _CountingWrap(nn.Module):
    """Stands in for DDP: the loop's prepared module, with a call counter."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


class _WrappingSession(LocalSession):
    def prepare_model(self, model):
        return _CountingWrap(model.to(self.device))


def test_connector_is_called_through_the_module_the_loop_prepared(tmp_path):
    """Under DDP the prepared module averages the connector's gradients; calling the bare one would not."""
    cfg = tiny_run_config("srd", train={"steps": 2, "eval_every": 2})
    seen = {}
    train_loop(cfg, _WrappingSession(tmp_path / "run"), tmp_path / "run", teacher_dir=tiny_teacher(cfg, tmp_path),
               on_end=lambda ctx, m: seen.update(ctx=ctx))  # fmt: skip
    assert seen["ctx"].modules["connector"].calls == 2 and seen["ctx"].model.calls >= 2


def test_other_teacher_architecture_is_bridged_by_the_connector(tmp_path):
    raw = tiny_run_config("srd", train={"steps": 2, "eval_every": 2}).model_dump(mode="json")
    raw["teacher"]["run"]["model"] = {"name": "small_cnn", "width": 12}
    raw["teacher"]["run"]["train"].update(steps=2, eval_every=2)
    cfg = parse_run_config(raw)
    seen = {}
    metrics = train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run",
                         teacher_dir=tiny_teacher(cfg, tmp_path), on_end=lambda ctx, m: seen.update(m=m))  # fmt: skip
    assert seen["m"].connector.proj.weight.shape == (48, 32, 1, 1)  # student 4*8 channels -> teacher 4*12
    assert math.isfinite(metrics["loss_srd"]) and math.isfinite(metrics["loss_feat"])


def test_open_set_run_logs_seen_and_unseen_and_a_mismatched_teacher_is_refused(tmp_path):
    raw = tiny_run_config("srd", train={"steps": 2, "eval_every": 2}).model_dump(mode="json")
    raw["data"]["open_set"] = raw["teacher"]["run"]["data"]["open_set"] = {"unseen_classes": [7, 8, 9]}
    cfg = parse_run_config(raw)
    metrics = train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run", teacher_dir=tiny_teacher(cfg, tmp_path))
    for key in ("srd_seen", "srd_unseen", "teacher_conf_seen", "teacher_conf_unseen"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 < metrics["unseen_rate"] < 1.0
    # a 10-class teacher checkpoint for a 7-class student: one clear error
    closed = tiny_run_config("srd")
    other = tiny_teacher(closed, tmp_path / "closed")
    raw.pop("teacher")
    raw["teacher"] = {"checkpoint": str(other)}
    with pytest.raises(ConfigError, match="10 outputs") as info:
        train_loop(parse_run_config(raw), LocalSession(tmp_path / "bad"), tmp_path / "bad", teacher_dir=other)
    assert info.value.field == "teacher"


def test_srd_knob_rules():
    base = tiny_run_config("srd").model_dump(mode="json")
    for knob, value in (("gamma_ce", 0.0), ("distance", "cosine"), ("connector", "mlp"), ("beta", -1.0)):
        with pytest.raises(ConfigError) as info:
            parse_run_config({**base, "method": {"name": "srd", knob: value}})
        assert info.value.field == f"method.{knob}"
