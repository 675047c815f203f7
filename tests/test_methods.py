"""Tests parametrised over the method registry: every method registered later is covered here
without editing this file — one tiny in-process step, and a few steps under 2 DDP ranks through Ray
Train (gloo) whose ranks must end with identical weights and method state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raykd.methods import METHODS
from raykd.models import build_model
from raykd.testing import flat_state, tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop


@pytest.mark.parametrize("method", METHODS.names())
def test_one_tiny_train_step_in_process(method, tmp_path):
    cfg = tiny_run_config(method, train={"steps": 1, "eval_every": 1})
    seen = {}

    def grab(ctx, m):
        seen["model"] = flat_state(ctx.raw_model)
        seen["ctx"] = ctx

    session = LocalSession(tmp_path)
    metrics = train_loop(cfg, session, tmp_path, on_end=grab, teacher_dir=tiny_teacher(cfg, tmp_path))
    assert metrics["step"] == 1 and 0.0 <= metrics["test_acc"] <= 1.0
    assert math.isfinite(metrics["loss"])
    torch.manual_seed(cfg.train.seed)  # the loop's initialisation, rebuilt: the step moved the weights
    init = build_model("small_cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    init = METHODS.get(method).configure_model(init, cfg, (1, 8, 8))  # as the loop builds it (e.g. TSKD's exits)
    assert flat_state(init).shape == seen["model"].shape
    assert not torch.equal(flat_state(init), seen["model"])
    assert session.latest_checkpoint() is not None


#: knob settings probed under DDP besides each method's defaults (state that other modes keep)
DDP_VARIANTS = {
    "layermatch-feature_center": ("layermatch", {"avg_mode": "feature_center", "threshold": 0.105}),
    "layermatch-soft_avg": ("layermatch", {"avg_mode": "soft_avg", "threshold": 0.105}),
}
PROBED = {**{m: (m, {}) for m in METHODS.names()}, **DDP_VARIANTS}


@pytest.fixture(scope="module")
def ddp_probe(tmp_path_factory, ray_local):
    """Every registered method, 3 steps each, under 2 DDP ranks (gloo) in one Ray Train run: one
    worker-group start for all methods. Returns (root folder, the run's error or None)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raykd.testing import ddp_probe_worker

    root = tmp_path_factory.mktemp("ddp_probe")
    runs = []
    for method, (name, knobs) in PROBED.items():
        cfg = tiny_run_config(name, method=knobs, train={"steps": 3, "eval_every": 3}, scaling={"num_workers": 2})
        (root / method).mkdir()
        teacher = tiny_teacher(cfg, root / "teachers")  # trained in-process once, shared by its users
        runs.append({"config": cfg.model_dump(mode="json"), "dir": str(root / method),
                     "teacher_dir": str(teacher) if teacher else None})  # fmt: skip
    trainer = TorchTrainer(
        ddp_probe_worker,
        train_loop_config={"runs": runs},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="probe", storage_path=str(root), failure_config=ray.train.FailureConfig(controller_failure_limit=0)
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - each method's test reports it (the methods before it passed)
        return root, err
    return root, None


@pytest.mark.ray
@pytest.mark.parametrize("method", list(PROBED))
def test_two_ddp_ranks_keep_identical_weights(method, ddp_probe):
    root, error = ddp_probe
    if not (root / method / "rank_1.pt").exists():
        pytest.fail(f"the 2-rank run did not finish {method}: {error}")
    assert json.loads((root / method / "rank_0.json").read_text())["world_size"] == 2
    r0 = torch.load(root / method / "rank_0.pt", weights_only=True)
    r1 = torch.load(root / method / "rank_1.pt", weights_only=True)
    assert torch.equal(r0["model"], r1["model"])
    assert r0["method"].keys() == r1["method"].keys()
    for key in r0["method"]:
        assert torch.equal(torch.as_tensor(r0["method"][key]), torch.as_tensor(r1["method"][key])), key
