"""Seed repeats in a study (``tune.repeats``): the aggregate on hand-made per-seed values, ties in
one seed broken by the aggregate, what a repeated trial holds, the checks before Ray, and (Ray) a
digits study with 3 seeds per configuration that is killed, resumed without retraining a finished
seed, and exported with every seed in its provenance.  The driver's one-teacher-per-seed training
is shared with ablations (raykd.tune.repeats.prepare_teachers; tested by the ablation test)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from raykd.config import parse_config
from raykd.errors import ConfigError
from raykd.report import rank_trials, seed_aggregate
from raykd.testing import process_tree, tiny_run_config
from raykd.train.runfolder import RunFolder
from raykd.tune.config import StudyConfig, TuneSettings
from raykd.tune.repeats import RepeatPlan, aggregate_row, repeat_seeds, seeded
from raykd.tune.resources import trial_needs, trials_that_fit

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# the aggregate


def test_seed_aggregate_on_hand_made_values():
    xs = [0.8, 1.0, 0.9]  # mean 0.9, sample std 0.1
    assert seed_aggregate(xs, "mean") == pytest.approx(0.9)
    assert seed_aggregate(xs, "mean_minus_std") == pytest.approx(0.8)
    assert seed_aggregate(xs, "mean_minus_std", mode="min") == pytest.approx(1.0)  # one std towards worse
    # 0.9 - t(0.975, 2) * 0.1 / sqrt(3), t(0.975, 2) = 4.302653
    assert seed_aggregate(xs, "lower_ci") == pytest.approx(0.9 - 4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    assert seed_aggregate(xs, "lower_ci", mode="min") == pytest.approx(0.9 + 4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    assert seed_aggregate([0.5, 0.5], "mean_minus_std") == 0.5  # no spread, no penalty
    with pytest.raises(ValueError, match="two values"):
        seed_aggregate([0.9], "mean_minus_std")
    with pytest.raises(ValueError, match="aggregate must be"):
        seed_aggregate(xs, "median")


def _plan(aggregate: str = "mean") -> RepeatPlan:
    return RepeatPlan(seeds=(0, 1, 2), parallel=2, metric="val_acc", mode="max", aggregate=aggregate)


def _trial(trial_id: str, per_seed: list[float], plan: RepeatPlan) -> dict:
    rows = {s: {"step": 10, "epoch": 1, "val_acc": v, "test_acc": v - 0.05, "params": 1000}
            for s, v in zip(plan.seeds, per_seed, strict=True)}  # fmt: skip
    return {"trial_id": trial_id, "state": "done", "params": {}, "metrics": aggregate_row(rows, plan)}


def test_aggregate_row_means_every_metric_and_keeps_what_the_seeds_share():
    plan = _plan("mean_minus_std")
    m = _trial("a", [0.8, 1.0, 0.9], plan)["metrics"]
    assert m["step"] == 10 and m["epoch"] == 1 and m["params"] == 1000  # equal on every seed: kept as is
    assert m["val_acc"] == pytest.approx(0.9) and m["val_acc_std"] == pytest.approx(0.1)
    assert m["test_acc"] == pytest.approx(0.85) and m["test_acc_std"] == pytest.approx(0.1)
    assert m["val_acc_mean_minus_std"] == pytest.approx(0.8) and m["n_seeds"] == 3
    assert m["seed_values"] == {"0": 0.8, "1": 1.0, "2": 0.9}
    assert plan.selection == "val_acc_mean_minus_std" and _plan("mean").selection == "val_acc"


def test_a_tie_on_one_seed_is_broken_by_the_aggregate():
    # the quickstart's case: two configurations reach the same val_acc on seed 0 (0.96)
    plan = _plan("mean")
    lucky, robust = [0.96, 0.80, 0.82], [0.96, 0.94, 0.95]
    one_seed = [{"trial_id": t, "state": "done", "params": {}, "metrics": {"val_acc": v[0]}}
                for t, v in (("lucky", lucky), ("robust", robust))]  # fmt: skip
    assert [r["trial_id"] for r in rank_trials(one_seed, "val_acc", "max")] == ["lucky", "robust"]  # a tie: order
    three = [_trial("lucky", lucky, plan), _trial("robust", robust, plan)]
    assert [r["trial_id"] for r in rank_trials(three, "val_acc", "max")] == ["robust", "lucky"]
    # equal means, different spreads: mean_minus_std prefers the steady one, whatever started first
    plan = _plan("mean_minus_std")
    spread, steady = _trial("spread", [0.8, 1.0, 0.9], plan), _trial("steady", [0.9, 0.9, 0.9], plan)
    assert spread["metrics"]["val_acc"] == pytest.approx(steady["metrics"]["val_acc"])
    ranked = rank_trials([spread, steady], plan.selection, "max")
    assert [r["trial_id"] for r in ranked] == ["steady", "spread"]


# --------------------------------------------------------------------------------------------
# seeds, resources and the checks before Ray


def test_repeat_seeds_follow_the_base_seed_and_set_the_split_too():
    base = tiny_run_config("kd_fixmatch", train={"seed": 7}, data={"seed": 3},
                           teacher={"run": {"model": {"name": "small_cnn"}, "method": {"name": "supervised"},
                                            "train": {"steps": 2}}})  # fmt: skip
    assert repeat_seeds(base, 3) == [7, 8, 9]
    cfg = seeded(base, 8)
    assert (cfg.train.seed, cfg.data.seed) == (8, 8)
    assert (cfg.teacher.run.train.seed, cfg.teacher.run.data.seed) == (8, 8)  # the teacher saw this seed's split


def test_each_seed_runs_with_its_own_teacher(tmp_path):
    from raykd.tune.repeats import RepeatedTrial

    base = tiny_run_config("kd", train={"seed": 4})
    plan = RepeatPlan(seeds=(4, 5), parallel=1, metric="test_acc", mode="max", aggregate="mean")
    teachers = {4: "/t/four", 5: "/t/five"}  # what make_trainable hands over: one teacher folder per seed
    trial = RepeatedTrial(base, tmp_path / "trial", plan, teachers, watched=("test_acc",))
    assert trial.teachers == {4: "/t/four", 5: "/t/five"}
    assert {s: (c.train.seed, c.data.seed, c.teacher.run.data.seed) for s, c in trial.configs.items()} == {
        4: (4, 4, 4), 5: (5, 5, 5)}  # fmt: skip
    assert trial.seeds[5].path == tmp_path / "trial" / "seeds" / "5"
    fixed = RepeatedTrial(base, tmp_path / "t2", plan, {None: "/t/one"}, watched=())  # a teacher.checkpoint
    assert fixed.teachers == {4: "/t/one", 5: "/t/one"}


def test_a_repeated_trial_holds_its_parallel_seeds():
    base = tiny_run_config("fixmatch")  # 1 worker, 1 CPU
    assert trial_needs(base) == {"CPU": 1.0}
    assert trial_needs(base, parallel=2) == {"CPU": pytest.approx(2.01)}
    assert trials_that_fit(base, [{"CPU": 8.0}], parallel=3) == 2
    ddp = tiny_run_config("fixmatch", scaling={"num_workers": 2})
    assert trial_needs(ddp, parallel=2) == {"CPU": pytest.approx(2 * 2.01 + 0.01)}


@pytest.mark.parametrize(
    ("tune", "field"),
    [
        ({"aggregate": "mean_minus_std"}, "tune.aggregate"),  # a spread needs 2 seeds or more
        ({"repeats": 0}, "tune.repeats"),
        ({"repeats": 3, "aggregate": "median"}, "tune.aggregate"),
        ({"repeats": 2, "scheduler": "none",
          "objectives": [{"metric": "val_acc"}, {"metric": "params", "mode": "min"}]}, "tune.repeats"),
    ],
)
def test_bad_repeat_settings_are_refused_naming_the_field(tune, field):
    raw = {"name": "s", "base": tiny_run_config("fixmatch").model_dump(mode="json", exclude={"provenance"}),
           "search": {"method.threshold": {"uniform": [0.7, 0.99]}}, "tune": tune}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        parse_config(raw, StudyConfig)
    assert e.value.field == field, str(e.value)


def test_repeats_with_a_cloud_uri_are_refused_before_ray():
    from raykd.tune.study import check_study

    raw = {"name": "s", "base": tiny_run_config("fixmatch").model_dump(mode="json", exclude={"provenance"}),
           "search": {"method.threshold": {"uniform": [0.7, 0.99]}},
           "tune": {"repeats": 2, "storage": "s3://bucket/studies"}}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_study(parse_config(raw, StudyConfig))
    assert e.value.field == "tune.repeats"


def test_selection_names_the_aggregate():
    assert TuneSettings().selection == "val_acc"
    assert TuneSettings(repeats=3).selection == "val_acc"  # the mean keeps the metric's name
    assert TuneSettings(repeats=3, aggregate="lower_ci").selection == "val_acc_lower_ci"


# --------------------------------------------------------------------------------------------
# a study with repeats through Ray Tune + Optuna: kill, resume, export


def _study(tmp_path: Path) -> Path:
    base = tiny_run_config("fixmatch", train={"steps": 100, "eval_every": 10})
    raw = {"name": "rep", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
           "tune": {"num_samples": 2, "max_concurrent": 1, "scheduler": "none", "repeats": 3,
                    "aggregate": "mean_minus_std"}}  # fmt: skip
    path = tmp_path / "rep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.ray
def test_a_killed_study_with_repeats_resumes_without_retraining_finished_seeds(tmp_path):
    storage = tmp_path / "runs"
    d = storage / "rep"
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, "-m", "raykd.cli", "study", "run", str(_study(tmp_path)), "--storage", str(storage)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    # kill the driver and every process under it (its Ray, the seeds' workers), as a crash of the machine
    # would, once one configuration is done and the next one's seeds are half-way
    second = None
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        done = list(d.glob("trials/*/result.json"))
        if len(done) == 1:
            second = next((p.parent.parent.parent for p in d.glob("trials/*/seeds/*/progress.jsonl")
                           if p.parent.parent.parent != done[0].parent and p.read_text().count("\n") >= 2), None)
            if second is not None:
                break
        time.sleep(0.05)
    for pid in reversed(process_tree(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in d.glob("trials/*/seeds/*/result.json")}
    unfinished = [p for p in (second / "seeds").iterdir() if not (p / "result.json").exists()]
    assert len(finished) >= 3 and len(list(d.glob("trials/*/result.json"))) == 1 and unfinished
    started = {p: RunFolder(p).progress()[0] for p in unfinished if len(RunFolder(p).progress()) >= 2}
    assert started  # a seed half-way: it must continue from its checkpoint, not from step 0

    res = subprocess.run([sys.executable, "-m", "raykd.cli", "study", "resume", str(d)], capture_output=True,
                         text=True, timeout=400, env=env)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(finished)} finished seed run(s) kept" in res.stdout
    for p, mtime in finished.items():  # a finished seed is never trained again
        assert p.stat().st_mtime_ns == mtime, p
    for p, first in started.items():  # a half-way seed kept its first evaluation: it resumed
        assert RunFolder(p).progress()[0] == first
    trials = sorted(p.parent for p in d.glob("trials/*/result.json"))
    assert len(trials) == 2
    for t in trials:
        result = json.loads((t / "result.json").read_text())
        per_seed = [json.loads((t / "seeds" / str(s) / "result.json").read_text()) for s in (0, 1, 2)]
        values = [r["val_acc"] for r in per_seed]
        assert result["n_seeds"] == 3 and result["val_acc"] == pytest.approx(sum(values) / 3)
        assert result["val_acc_mean_minus_std"] == pytest.approx(seed_aggregate(values, "mean_minus_std"))
        for s in (0, 1, 2):  # each seed: its own labeled split and initialisation
            cfg = yaml.safe_load((t / "seeds" / str(s) / "config.yaml").read_text())
            assert cfg["data"]["seed"] == cfg["train"]["seed"] == s
        for s in (0, 1, 2):  # no seed started over: every step once
            steps = [json.loads(x)["step"] for x in (t / "seeds" / str(s) / "progress.jsonl").read_text().splitlines()]
            assert steps == list(range(10, 101, 10)), (t.name, s, steps)
        steps = [json.loads(x)["step"] for x in (t / "progress.jsonl").read_text().splitlines()]
        assert steps == list(range(10, 101, 10))
    # Optuna saw one trial per configuration, valued at the aggregate
    ot = optuna.load_study(study_name="rep", storage=f"sqlite:///{d / 'optuna.db'}")
    assert sorted(t.state.name for t in ot.trials) == ["COMPLETE", "COMPLETE"]
    assert ot.metric_names == ["val_acc_mean_minus_std"]
    by_id = {t.user_attrs["raykd_trial_id"]: t.value for t in ot.trials}
    for t in trials:
        assert by_id[t.name] == pytest.approx(json.loads((t / "result.json").read_text())["val_acc_mean_minus_std"])
    # the export: the best configuration by the aggregate, every seed in its provenance
    best = yaml.safe_load((d / "best.yaml").read_text())
    prov = best["provenance"]
    assert prov["selected_on"] == "val_acc_mean_minus_std" and prov["metrics"]["n_seeds"] == 3
    assert [s["seed"] for s in prov["repeats"]["seeds"]] == [0, 1, 2]
    assert all(s["state"] == "done" and "val_acc" in s for s in prov["repeats"]["seeds"])
    top = max(trials, key=lambda t: json.loads((t / "result.json").read_text())["val_acc_mean_minus_std"])
    assert prov["trial_id"] == top.name
    assert best["train"]["seed"] == 0 and best["data"]["seed"] == 0  # seed 0's run, re-runnable as it is
    status = subprocess.run([sys.executable, "-m", "raykd.cli", "study", "status", str(d)], capture_output=True,
                            text=True, timeout=60, env=env).stdout  # fmt: skip
    assert "val_acc mean ± std (n)" in status and "(n=3)" in status and status.count("3/3 done") == 2
    assert "## Seeds" in (d / "study.md").read_text()

