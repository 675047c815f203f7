"""TSKD (docs/methods.md, `tskd`): the multi-exit wrapper's shapes on every model family,
vote semantics on hand-made logits, the stop-gradient on the deepest exit, the loss terms, the frozen
teacher, per-exit metrics, checkpoints and config rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raykd.config import dump_run_config, parse_run_config
from raykd.errors import ConfigError
from raykd.methods.kd import kd_loss
from raykd.methods.tskd import TSKD, ensemble_vote, self_distillation_losses, tskd_loss
from raykd.models import build_model
from raykd.models.multi_exit import MultiExit
from raykd.testing import flat_state, record_optimised, tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop
from raykd.train.teacher import load_teacher
from raykd.tune.space import check_metric

# ---------------------------------------------------------------------------------------------
# the multi-exit wrapper


@pytest.mark.parametrize(
    ("name", "args", "shape", "stages"),
    [("small_cnn", {"width": 4}, (1, 8, 8), 3), ("wrn_28_2", {}, (3, 8, 8), 3), ("resnet18", {}, (3, 8, 8), 4)],
)
def test_every_exit_has_the_deepest_shape_and_the_deepest_exit_is_the_backbone(name, args, shape, stages):
    torch.manual_seed(0)
    backbone = build_model(name, num_classes=5, in_channels=shape[0], image_size=shape[1], **args)
    model = MultiExit(backbone, range(stages), shape).eval()
    x = torch.randn(2, *shape)
    logits, feats = model(x, all_exits=True)
    assert logits.shape == (stages, 2, 5) and feats.shape == (stages, 2, backbone.feature_dim)
    maps = model.stages(x)
    for s, bottleneck in zip(model.exit_stages[:-1], model.bottlenecks, strict=True):
        assert bottleneck(maps[s]).shape[1:] == maps[-1].shape[1:]  # last stage's width and resolution
    torch.testing.assert_close(logits[-1], backbone(x))  # the deepest exit is the network's own head
    torch.testing.assert_close(model(x), backbone(x))  # plain forward = the deepest exit
    torch.testing.assert_close(model(x, with_map=True)[1], backbone.feature_map(x))  # SSLModel contract kept
    assert ensemble_vote(logits, "soft").shape == backbone(x).shape  # the vote looks like one exit
    two = MultiExit(backbone, [-2, -1], shape)
    assert two.exit_stages == (stages - 2, stages - 1) and two(x, all_exits=True)[0].shape == (2, 2, 5)


def test_wrapping_leaves_the_backbone_bn_statistics_alone():
    backbone = build_model("small_cnn", num_classes=3, in_channels=1, image_size=8, width=4)
    before = flat_state(backbone)
    MultiExit(backbone, [0, 1], (1, 8, 8))
    assert torch.equal(flat_state(backbone), before) and backbone.training


# ---------------------------------------------------------------------------------------------
# votes


def _logits(*probs: list[float]) -> torch.Tensor:
    """Exit logits [K, 1, C] whose softmax is exactly ``probs`` (log-probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log().unsqueeze(1)


def test_soft_vote_averages_probabilities_and_hard_vote_follows_the_majority():
    # two exits lean weakly to class 0, one is sure of class 1
    q = _logits([0.40, 0.35, 0.25], [0.40, 0.35, 0.25], [0.05, 0.90, 0.05])
    soft = ensemble_vote(q, "soft")
    torch.testing.assert_close(soft.exp(), torch.tensor([[0.85 / 3, 1.60 / 3, 0.55 / 3]]))
    assert soft.argmax(-1).item() == 1  # confidence wins the average
    assert ensemble_vote(q, "hard").argmax(-1).item() == 0  # two votes beat one


def test_hard_vote_ties_go_to_the_larger_summed_probability_then_the_lowest_class():
    q = _logits([0.60, 0.10, 0.30], [0.05, 0.05, 0.90])  # one vote each for 0 and 2
    assert ensemble_vote(q, "hard").argmax(-1).item() == 2  # sums: 0.65 for class 0, 1.2 for class 2
    q = _logits([0.30, 0.10, 0.60], [0.90, 0.05, 0.05])
    assert ensemble_vote(q, "hard").argmax(-1).item() == 0  # 1.2 vs 0.9: the vote is not "first exit"
    for order in ([0.7, 0.3], [0.3, 0.7]), ([0.3, 0.7], [0.7, 0.3]):
        assert ensemble_vote(_logits(*order), "hard").argmax(-1).item() == 0  # equal counts and sums
    # counts dominate any probability mass: 2 votes for class 1 vs one confident vote for class 0
    q = _logits([0.99, 0.005, 0.005], [0.34, 0.35, 0.31], [0.34, 0.35, 0.31])
    assert ensemble_vote(q, "hard").argmax(-1).item() == 1


def test_weighted_vote_weights_each_exit_probability():
    q = _logits([0.40, 0.35, 0.25], [0.40, 0.35, 0.25], [0.05, 0.90, 0.05])
    w = torch.tensor([0.9, 0.8, 0.05])
    expected = (w.view(3, 1, 1).double() * q.exp()).sum(0) / w.sum()
    torch.testing.assert_close(ensemble_vote(q, "weighted", w).exp(), expected.float())
    assert ensemble_vote(q, "weighted", w).argmax(-1).item() == 0  # the accurate shallow exits win
    assert ensemble_vote(q, "weighted", torch.tensor([0.1, 0.1, 0.9])).argmax(-1).item() == 1
    for equal in (None, torch.zeros(3), torch.ones(3)):  # no information: the soft vote
        torch.testing.assert_close(ensemble_vote(q, "weighted", equal), ensemble_vote(q, "soft"))
    with pytest.raises(ValueError, match="unknown vote"):
        ensemble_vote(q, "median")


# ---------------------------------------------------------------------------------------------
# losses


def test_self_distillation_sends_no_gradient_to_the_deepest_exit():
    logits = torch.randn(3, 4, 5, requires_grad=True)
    feats = torch.randn(3, 4, 6, requires_grad=True)
    loss_sd, loss_feat = self_distillation_losses(logits, feats, temperature=3.0)
    (loss_sd + loss_feat).backward()
    assert torch.count_nonzero(logits.grad[-1]) == 0 and torch.count_nonzero(feats.grad[-1]) == 0
    assert logits.grad[:-1].abs().sum() > 0 and feats.grad[:-1].abs().sum() > 0
    q, f = logits.detach(), feats.detach()
    expected_sd = kd_loss(q[0], q[2], 3.0) + kd_loss(q[1], q[2], 3.0)
    expected_feat = ((f[0] - f[2]) ** 2).mean() + ((f[1] - f[2]) ** 2).mean()
    torch.testing.assert_close(loss_sd, expected_sd)
    torch.testing.assert_close(loss_feat, expected_feat)


def test_self_distillation_terms_leave_the_last_stage_and_head_without_gradient():
    torch.manual_seed(0)
    model = MultiExit(build_model("small_cnn", num_classes=4, in_channels=1, image_size=8, width=4), [0, 1], (1, 8, 8))
    logits, feats = model(torch.randn(6, 1, 8, 8), all_exits=True)
    sum(self_distillation_losses(logits, feats, 3.0)).backward()
    deep = [*model.backbone.blocks[-1].parameters(), *model.backbone.classifier.parameters()]
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in deep)  # (stack passes zeros)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())


def test_loss_puts_ce_on_labeled_rows_and_the_other_terms_on_every_row():
    torch.manual_seed(0)
    logits, feats, z_t = torch.randn(3, 6, 4), torch.randn(3, 6, 5), torch.randn(6, 4)
    y = torch.tensor([0, 3])  # rows 0-1 labeled, 2-5 unlabeled
    ce_only = TSKD.Config(w_ce=1.0, w_kd=0.0, w_sd=0.0, w_feat=0.0)
    loss, logs = tskd_loss(logits, feats, y, z_t, ce_only)
    torch.testing.assert_close(loss, sum(F.cross_entropy(q[:2], y) for q in logits))
    changed = logits.clone()
    changed[:, 2:] += torch.randn(3, 4, 4)
    torch.testing.assert_close(tskd_loss(changed, feats, y, z_t, ce_only)[0], loss)  # unlabeled: no CE
    cfg = TSKD.Config(w_ce=0.0, w_kd=0.5, T_kd=2.0, w_sd=0.3, T_sd=3.0, w_feat=0.1)
    loss, logs = tskd_loss(logits, feats, y, z_t, cfg)
    sd, feat = self_distillation_losses(logits, feats, 3.0)
    kd = sum(kd_loss(q, z_t, 2.0) for q in logits)  # every exit, all six rows
    torch.testing.assert_close(loss, 0.5 * kd + 0.3 * sd + 0.1 * feat)
    assert set(logs) == set(TSKD.Config.logs(None))
    assert tskd_loss(changed, feats, y, z_t, cfg)[0] != loss  # unlabeled rows do count here


# ---------------------------------------------------------------------------------------------
# training through the loop


def test_teacher_frozen_per_exit_metrics_weighted_vote_and_a_tskd_teacher(tmp_path, monkeypatch):
    cfg = tiny_run_config("tskd", train={"steps": 3, "eval_every": 3}, method={"vote": "weighted"})
    teacher_dir = tiny_teacher(cfg, tmp_path)
    before = flat_state(load_teacher(teacher_dir, torch.device("cpu")))
    optimised = record_optimised(monkeypatch)
    seen = {}
    run = tmp_path / "run"
    metrics = train_loop(cfg, LocalSession(run), run, teacher_dir=teacher_dir,
                         on_end=lambda ctx, m: seen.update(ctx=ctx, method=m))  # fmt: skip
    teacher, student = seen["ctx"].teacher, seen["ctx"].raw_model
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert torch.equal(flat_state(teacher), before)
    ids = {id(p) for p in optimised}
    assert not ids & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in student.parameters()} <= ids  # exits included
    assert isinstance(student, MultiExit) and student.num_exits == 3
    # every declared evaluation metric is reported, and the configured vote is test_acc
    declared = TSKD.Config.eval_metrics(cfg)
    assert {"test_exit1_acc", "test_exit3_acc", "val_vote_hard_acc"} <= set(declared) <= set(metrics)
    assert metrics["test_acc"] == metrics["test_vote_weighted_acc"]
    # the weighted vote's weights are the evaluated model's validation accuracies per exit
    weights = seen["method"].state_dict()["exit_weights"].tolist()
    assert weights == pytest.approx([metrics[f"val_exit{s}_acc"] for s in (1, 2, 3)])
    # a TSKD run can itself be a teacher: loaded with its exits, frozen
    (run / "config.yaml").write_text(dump_run_config(cfg))
    loaded = load_teacher(run, torch.device("cpu"))
    assert isinstance(loaded, MultiExit) and not loaded.training


def test_resume_restores_the_exits_and_equal_weights_without_validation(tmp_path):
    cfg = tiny_run_config("tskd_sd", data={"val_per_class": 0}, train={"steps": 4, "eval_every": 2})
    seen = {}
    full = train_loop(cfg, LocalSession(tmp_path / "a"), tmp_path / "a",
                      on_end=lambda ctx, m: seen.update(a=flat_state(ctx.raw_model), w=m.exit_weights))  # fmt: skip
    assert torch.equal(seen["w"], torch.ones(3, dtype=torch.float64))  # weighted falls back to soft
    assert full["test_vote_weighted_acc"] == full["test_vote_soft_acc"]
    b = LocalSession(tmp_path / "b")
    train_loop(cfg, b, tmp_path / "b", stop_at=2)
    resumed = train_loop(cfg, b, tmp_path / "b", on_end=lambda ctx, m: seen.update(b=flat_state(ctx.raw_model)))
    assert torch.equal(seen["a"], seen["b"]) and resumed["test_acc"] == full["test_acc"]


# ---------------------------------------------------------------------------------------------
# configs


def test_config_rules_teacher_and_metrics():
    with pytest.raises(ConfigError) as e:
        tiny_run_config("tskd_sd", teacher={"checkpoint": "/nowhere"})
    assert e.value.field == "teacher"
    raw = tiny_run_config("tskd").model_dump(mode="json", exclude={"provenance"})
    raw.pop("teacher")
    with pytest.raises(ConfigError, match="needs a teacher"):
        parse_run_config(raw)
    with pytest.raises(ConfigError) as e:
        tiny_run_config("tskd", method={"vote": "median"})
    assert e.value.field == "method.vote"
    cfg = tiny_run_config("tskd", method={"exits": "last_two"})
    check_metric(cfg, "val_exit2_acc")
    check_metric(cfg, "test_vote_hard_acc")
    with pytest.raises(ConfigError, match="never report"):
        check_metric(cfg, "val_exit1_acc")  # no exit after stage 1 with last_two
    raw["teacher"] = {"checkpoint": "/nowhere"}
    raw["model"] = {"name": "resnet18"}  # four stages, counted without building real weights
    heads = TSKD.Config.eval_heads(parse_run_config(raw))
    assert heads == ("exit1", "exit2", "exit3", "exit4", "vote_soft", "vote_hard", "vote_weighted", "vote_mean_logits")


def test_byot_options_mean_logits_vote_plain_kl_and_shallow_ce_weight():
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 1.5, 0.0]]])  # 3 exits, 1 sample
    torch.testing.assert_close(ensemble_vote(logits, "mean_logits"), torch.tensor([[2 / 3, 2.5 / 3, 0.0]]))
    assert ensemble_vote(logits, "mean_logits").argmax(-1).item() == 1
    torch.manual_seed(0)
    q, f = torch.randn(3, 6, 4), torch.randn(3, 6, 5)
    with_t2, _ = self_distillation_losses(q, f, 3.0)
    plain, _ = self_distillation_losses(q, f, 3.0, t_squared=False)
    torch.testing.assert_close(plain * 9.0, with_t2)  # BYOT's gradient is 1/T² of ours at T 3
    y = torch.tensor([0, 1, 2, 3])
    ce = [torch.nn.functional.cross_entropy(x[:4], y) for x in q]
    byot = TSKD.Config(w_kd=0.0, w_sd=0.0, w_feat=0.0, w_ce_shallow=0.7)
    loss, logs = tskd_loss(q, f, y, None, byot)
    torch.testing.assert_close(loss, ce[2] + 0.7 * (ce[0] + ce[1]))
