"""The method contract, for every registered method (a new method file is covered without editing
this one): the logs a method emits are exactly the ones its Config declares, and its state_dict
survives a round trip into a freshly set-up method.  Also the study-folder contract: ``raykd report``
on a study folder, and one best trial for status, study.md and export when trials tie."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
import yaml

from raykd.cli import main
from raykd.config import parse_run_config
from raykd.registry import METHODS
from raykd.testing import tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import LOOP_METRICS, VAL_METRICS, train_loop
from raykd.train.runfolder import RunFolder

#: what the loop reports besides the method's logs and heads
LOOP_KEYS = set(LOOP_METRICS) | set(VAL_METRICS) | {"global_batch", "global_ubatch", "world_size", "evaluated"}
OPEN_SET = {"open_set": {"unseen_classes": [9]}}


def _run(method, tmp_path, **sections):
    cfg = tiny_run_config(method, **sections)
    seen = {}
    metrics = train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run",
                         teacher_dir=tiny_teacher(cfg, tmp_path / "t"),
                         on_end=lambda ctx, m: seen.update(ctx=ctx, method=m))  # fmt: skip
    return cfg, metrics, seen


@pytest.mark.parametrize("open_set", [False, True], ids=["closed_set", "open_set"])
@pytest.mark.parametrize("method", METHODS.names())
def test_emitted_logs_are_exactly_the_declared_ones(method, open_set, tmp_path):
    raw = tiny_run_config(method).model_dump(mode="json", exclude={"provenance"})
    if open_set:  # the student's and the teacher's data hold out the same class
        raw["data"].update(OPEN_SET)
        if raw.get("teacher"):
            raw["teacher"]["run"]["data"].update(OPEN_SET)
    cfg = parse_run_config(raw)
    metrics = train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run",
                         teacher_dir=tiny_teacher(cfg, tmp_path / "t"))  # fmt: skip
    facts = type(cfg.method)
    emitted = set(metrics) - LOOP_KEYS - set(facts.eval_metrics(cfg))
    assert emitted == set(facts.logs(cfg)), f"{method}: emitted {sorted(emitted)}, declared {facts.logs(cfg)}"
    assert set(facts.eval_metrics(cfg)) <= set(metrics)


@pytest.mark.parametrize("method", METHODS.names())
def test_state_dict_round_trips_into_a_fresh_method(method, tmp_path):
    """As a resume does it: setup, load_state_dict, on_train_start; the state is what was saved."""
    _, _, seen = _run(method, tmp_path, train={"steps": 2, "eval_every": 2})
    ctx, trained = seen["ctx"], seen["method"]
    state = trained.state_dict()
    fresh_ctx = dataclasses.replace(ctx, modules={})
    fresh = type(trained)(fresh_ctx)
    fresh_ctx.method = fresh
    fresh.setup()
    fresh.load_state_dict(state)
    fresh.on_train_start()
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    for key in state:
        assert torch.equal(torch.as_tensor(again[key]), torch.as_tensor(state[key])), f"{method}: {key}"


# ---------------------------------------------------------------------------------------------
# a study folder written by hand (no Ray): the trial folders a study leaves, with a tie


def _study_folder(tmp_path):
    base = tiny_run_config("fixmatch", train={"steps": 4, "eval_every": 2})
    d = tmp_path / "tied"
    study = {"name": "tied", "base": base.model_dump(mode="json", exclude={"provenance"}),
             "search": {"method.threshold": {"uniform": [0.7, 0.99]}},
             "tune": {"num_samples": 4, "metric": "val_acc", "scheduler": "none"}}  # fmt: skip
    d.mkdir()
    (d / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    trials = [("t_stopped", 0.99, None, 0.9), ("t_first", 0.8, 0.9, 0.81), ("t_second", 0.9, 0.9, 0.86),
              ("t_worse", 0.95, 0.6, 0.7)]  # fmt: skip
    for i, (tid, tau, val, test) in enumerate(trials):
        run = RunFolder(d / "trials" / tid)
        cfg = base.model_copy(deep=True)
        cfg.method.threshold = tau
        run.write_config(cfg)
        rec = {"step": 4 if val is not None else 2, "epoch": 2, "val_acc": val if val is not None else 0.95,
               "test_acc": test}  # fmt: skip
        run.append_progress(rec)
        if val is not None:
            run.write_result(rec)
        t = 1_000_000 + i  # the order the trials started
        os.utime(run.config_path, (t, t))
    return d


def test_status_report_and_export_star_the_same_trial_on_ties(tmp_path, capsys):
    d = _study_folder(tmp_path)
    assert main(["study", "status", str(d)]) == 0
    status = capsys.readouterr().out
    starred = [ln.split()[1] for ln in status.splitlines() if ln.startswith("*")]
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    assert "md:" in out and (d / "study.md").exists() and (d / "history.png").exists()
    md_star = [re.split(r"\s*\|\s*", ln)[2] for ln in (d / "study.md").read_text().splitlines()
               if ln.startswith("| * |")]  # fmt: skip
    assert main(["study", "export", str(d), "--out", str(tmp_path / "best.yaml")]) == 0
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())["provenance"]["trial_id"]
    # t_first and t_second tie at val_acc 0.9; t_stopped's 0.95 is from an unfinished trial
    assert starred == md_star == [exported] == ["t_first"]


def test_report_on_a_study_folder_writes_tables_and_plots(tmp_path, capsys):
    d = _study_folder(tmp_path)
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    for kind in ("csv", "md", "history", "metric_vs_method_threshold"):
        assert f"{kind}:" in out
    rows = (d / "study_trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    assert json.loads((d / "trials" / "t_first" / "result.json").read_text())["val_acc"] == 0.9
