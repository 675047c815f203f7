"""The cost metrics of a run (raykd.train.cost): parameters, MACs per image and latency, on
hand-made models whose figures are computed by hand; and a run reporting them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from raykd.testing import tiny_run_config
from raykd.train.context import LocalSession
from raykd.train.cost import COST_METRICS, count_macs, model_cost, used_parameters
from raykd.train.loop import train_loop


def plain(model, x):
    return model(x)


class WithUnusedHead(nn.Module):
    """A conv, a linear classifier and a head that prediction never calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)  # 1x5x5 -> 2x3x3
        self.fc = nn.Linear(18, 4)
        self.unused = nn.Linear(18, 100)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_params_are_the_sum_of_numel_of_what_prediction_runs():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.zeros(1, 4)
    assert used_parameters(net, lambda: net(x)) == sum(p.numel() for p in net.parameters()) == 4 * 3 + 3 + 3 * 2 + 2
    model = WithUnusedHead()
    used = used_parameters(model, lambda: model(torch.zeros(1, 1, 5, 5)))
    assert used == (2 * 9 + 2) + (18 * 4 + 4)  # the unused head is not counted
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, shared)  # a module called twice counts once
    assert used_parameters(tied, lambda: tied(torch.zeros(1, 3))) == 12


def test_macs_of_a_linear_and_a_conv_net_are_the_hand_computed_ones():
    lin = nn.Linear(4, 3)
    assert count_macs(lambda: lin(torch.zeros(1, 4))) == 4 * 3
    model = WithUnusedHead()
    # conv: 2 out channels x 3x3 positions x (1 in channel x 3x3 kernel) = 162; fc: 18 x 4 = 72 (biases not counted)
    assert count_macs(lambda: model(torch.zeros(1, 1, 5, 5))) == 2 * 3 * 3 * 9 + 18 * 4


def test_model_cost_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = model_cost(model, plain, torch.randn(1, 4))
    assert set(cost) == set(COST_METRICS) and cost["params"] == 4 * 4 + 4 + 8 and cost["macs"] == 16
    assert cost["latency_ms"] > 0 and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


def test_a_run_reports_its_cost_in_progress_and_result(tmp_path):
    """A multi-exit student (tskd_sd): every exit its vote runs counts."""
    cfg = tiny_run_config("tskd_sd", train={"steps": 2, "eval_every": 1})
    seen = {}
    metrics = train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run",
                         on_end=lambda ctx, _: seen.update(ctx=ctx))  # fmt: skip
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    for record in (result, *lines):
        assert isinstance(record["params"], int) and isinstance(record["macs"], int) and record["latency_ms"] > 0
    assert lines[0]["params"] == result["params"] and lines[0]["macs"] == result["macs"]
    model = seen["ctx"].raw_model
    assert len(model.exit_stages) > 1 and result["params"] == sum(p.numel() for p in model.parameters())
    assert not set(COST_METRICS) & set(metrics)  # the returned metrics are the evaluation's own


def test_a_running_trials_cost_is_refreshed_between_its_reports(tmp_path, monkeypatch):
    """A trial whose reports are far apart (seed repeats, long eval intervals) still has an up-to-date
    cost.json, so a Ctrl-C or a killed driver loses at most REFRESH_S of its spend."""
    import time
    from types import SimpleNamespace

    from raykd.tune import budget

    base = tiny_run_config("fixmatch")
    meter = budget.CostMeter(tmp_path, base, ["train.lr"], parallel=2)  # 2 seeds at once: 2 CPUs + the sliver
    trial = SimpleNamespace(trial_id="t1", config={"train.lr": 0.01})
    meter.on_trial_start(0, [trial], trial)
    path = tmp_path / "trials" / "t1" / "cost.json"
    meter.on_step_end(0, [trial])
    assert json.loads(path.read_text())["wall_s"] < 0.05
    time.sleep(0.2)
    meter.on_step_end(1, [trial])  # within REFRESH_S of the last refresh: no write
    assert json.loads(path.read_text())["wall_s"] < 0.05
    monkeypatch.setattr(budget, "REFRESH_S", 0.0)
    meter.on_step_end(2, [trial])
    cost = json.loads(path.read_text())
    assert cost["wall_s"] >= 0.2 and cost["held"] == 2.01
    assert cost["device_s"] == pytest.approx(cost["wall_s"] * 2.01, abs=0.002)  # each rounded to 1 ms
