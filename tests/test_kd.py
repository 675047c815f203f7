"""Teachers and vanilla KD (docs/methods.md, `kd`): the loss on hand-made logits, the frozen
teacher, the teacher cache, config rules."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from raykd.config import parse_run_config
from raykd.errors import ConfigError
from raykd.methods.kd import kd_loss
from raykd.testing import flat_state, record_optimised, tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop
from raykd.train.teacher import ensure_teacher, load_teacher, teacher_hash


def test_kd_loss_value_on_hand_made_logits_includes_t_squared():
    z_s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    z_t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    t = 2.0
    total = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist(), strict=True):
        e_s = [math.exp(v / t) for v in row_s]
        e_t = [math.exp(v / t) for v in row_t]
        p_s = [v / sum(e_s) for v in e_s]
        p_t = [v / sum(e_t) for v in e_t]
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    expected = t * t * total / 2  # T^2 * KL, averaged over the batch
    assert kd_loss(z_s, z_t, t).item() == pytest.approx(expected, rel=1e-5)  # float32
    assert kd_loss(z_t, z_t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_gradient_reaches_the_student_only():
    z_s = torch.randn(4, 5, requires_grad=True)
    z_t = torch.randn(4, 5, requires_grad=True)
    kd_loss(z_s, z_t, 4.0).backward()
    assert z_t.grad is None
    assert z_s.grad.abs().sum() > 0


def test_teacher_is_frozen_unchanged_and_never_optimised(tmp_path, monkeypatch):
    cfg = tiny_run_config("kd", train={"steps": 3, "eval_every": 3})
    teacher_dir = tiny_teacher(cfg, tmp_path)
    before = flat_state(load_teacher(teacher_dir, torch.device("cpu")))
    optimised = record_optimised(monkeypatch)
    seen = {}
    train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run", teacher_dir=teacher_dir,
               on_end=lambda ctx, m: seen.update(teacher=ctx.teacher, student=ctx.raw_model))  # fmt: skip
    teacher = seen["teacher"]
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert torch.equal(flat_state(teacher), before)  # weights and BN statistics untouched by training
    ids = {id(p) for p in optimised}
    assert not ids & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in seen["student"].parameters()} <= ids


def test_teacher_may_have_another_architecture(tmp_path):
    cfg = tiny_run_config("kd", train={"steps": 2, "eval_every": 2})
    raw = cfg.model_dump(mode="json", exclude={"provenance"})
    raw["teacher"]["run"]["model"] = {"name": "wrn_28_2"}
    raw["teacher"]["run"]["train"].update(steps=2, eval_every=2)
    cfg = parse_run_config(raw)
    teacher_dir = tiny_teacher(cfg, tmp_path)
    seen = {}

    def grab(ctx, method):
        seen.update(t=type(ctx.teacher).__name__, s=type(ctx.raw_model).__name__)

    metrics = train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run", teacher_dir=teacher_dir, on_end=grab)
    assert seen == {"t": "WideResNet", "s": "SmallCNN"}
    assert math.isfinite(metrics["loss_kd"]) and 0.0 <= metrics["teacher_agree"] <= 1.0


def test_teacher_is_trained_once_and_cached_by_its_config(tmp_path):
    cfg = tiny_run_config("kd")
    calls = []

    def fake_train(tcfg, folder):
        calls.append(folder)
        (folder / "result.json").write_text("{}")

    first = ensure_teacher(cfg, tmp_path, fake_train)
    again = ensure_teacher(cfg, tmp_path, fake_train)
    assert first == again and len(calls) == 1
    assert first.name == f"teacher-{teacher_hash(cfg.teacher.run)}"
    raw = cfg.model_dump(mode="json", exclude={"provenance"})
    raw["teacher"]["run"]["train"]["seed"] = 1
    other = ensure_teacher(parse_run_config(raw), tmp_path, fake_train)
    assert other != first and len(calls) == 2


def test_teacher_config_rules():
    base = tiny_run_config("kd").model_dump(mode="json", exclude={"provenance"})
    no_teacher = {k: v for k, v in base.items() if k != "teacher"}
    with pytest.raises(ConfigError) as info:
        parse_run_config(no_teacher)
    assert info.value.field == "teacher"
    with pytest.raises(ConfigError) as info:
        parse_run_config({**no_teacher, "method": {"name": "fixmatch"}, "teacher": base["teacher"]})
    assert info.value.field == "teacher"
    with pytest.raises(ConfigError) as info:
        parse_run_config({**base, "teacher": {"checkpoint": "x", "run": base["teacher"]["run"]}})
    assert info.value.field == "teacher"
    wrong = {**base, "teacher": {"run": {**base["teacher"]["run"], "data": {"name": "fashion_mnist"}}}}
    with pytest.raises(ConfigError) as info:
        parse_run_config(wrong)
    assert info.value.field == "teacher.run.data.name"
    with pytest.raises(ConfigError) as info:
        ensure_teacher(parse_run_config({**base, "teacher": {"checkpoint": "/nonexistent/run"}}), None, None)
    assert info.value.field == "teacher.checkpoint"


def test_a_checkpoint_teacher_on_other_classes_is_refused_before_training(tmp_path):
    """A ``teacher.checkpoint`` whose run held out other classes (another class count) gets one line
    naming ``teacher.checkpoint``, from the driver, before any student is built."""
    base = tiny_run_config("kd").model_dump(mode="json", exclude={"provenance"})
    teacher_run = {
        **base["teacher"]["run"],
        "data": {**base["teacher"]["run"]["data"], "open_set": {"unseen_classes": [9]}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(teacher_run))
    student = parse_run_config({**base, "teacher": {"checkpoint": str(tmp_path)}})
    with pytest.raises(ConfigError) as info:
        ensure_teacher(student, None, None)
    assert info.value.field == "teacher.checkpoint"
    assert "unseen classes are [9]" in info.value.message
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base["teacher"]["run"]))  # the same classes: accepted
    assert ensure_teacher(student, None, None) == tmp_path.resolve()
