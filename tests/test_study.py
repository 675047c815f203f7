"""Studies and ablations through Ray Tune + Optuna: validation, a study end to end with export and
re-run, kill + resume, an ablation's outputs, and ASHA stopping 2-worker Train-in-Tune trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from raykd.cli import main
from raykd.config import parse_config, parse_run_config
from raykd.errors import ConfigError
from raykd.testing import tiny_run_config
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop
from raykd.tune.config import StudyConfig
from raykd.tune.records import collect_trials, rank_trials
from raykd.tune.space import resolve_search, short_names

ROOT = Path(__file__).resolve().parents[1]


def tiny_base(**train) -> dict:
    cfg = tiny_run_config("fixmatch", train={"steps": 4, "eval_every": 2, **train})
    return cfg.model_dump(mode="json", exclude={"provenance"})


def study_raw(name="s", search=None, **tune) -> dict:
    return {
        "name": name,
        "base": tiny_base(),
        "search": search or {"method.threshold": {"uniform": [0.7, 0.99]}, "train.lr": "default"},
        "tune": {"num_samples": 3, "scheduler": "none", "metric": "val_acc", **tune},
    }


def write(tmp_path: Path, raw: dict, name="study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    return subprocess.run([sys.executable, "-m", "raykd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)  # fmt: skip


# --------------------------------------------------------------------------------------------
# validation before Ray starts


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"search": {"method.treshold": {"uniform": [0.7, 0.9]}}}, "search.method.treshold"),
        ({"search": {"optim.lr": {"uniform": [0.1, 0.2]}}}, "search.optim.lr"),
        ({"search": {"method.threshold": {"uniform": [0.9, 0.9]}}}, "search.method.threshold"),
        ({"search": {"method.threshold": {"uniform": [0.9, 0.7]}}}, "search.method.threshold"),
        ({"search": {"train.lr": {"loguniform": [0.0, 0.1]}}}, "search.train.lr"),
        ({"search": {"method.threshold": {"uniform": [0.5, 1.5]}}}, "search.method.threshold"),
        ({"search": {"method.threshold": {"normal": [0.5, 0.1]}}}, "search.method.threshold"),
        ({"search": {"method.hard_label": {"choice": [True]}}}, "search.method.hard_label"),
        ({"search": {"train.steps": "default"}}, "search.train.steps"),
        ({"search": {"method.name": {"choice": ["fixmatch", "supervised"]}}}, "search.method.name"),
        (
            {"search": {"data.open_set.unseen_fraction": {"uniform": [0.1, 0.5]}}},
            "search.data.open_set.unseen_fraction",
        ),  # open_set is not set in the base config
        ({"search": {"data.seed.x": {"int": [0, 3]}}}, "search.data.seed.x"),
        ({"search": {"method.threshold.x": {"uniform": [0.7, 0.9]}}}, "search.method.threshold.x"),
        ({"tune": {"metric": "val_accuracy"}}, "tune.metric"),
        ({"tune": {"metric": "accuracy", "mode": "max"}}, "tune.metric"),
        ({"tune": {"schedular": "asha"}}, "tune.schedular"),
        ({"tune": {"scheduler": "hyperband"}}, "tune.scheduler"),
    ],
)
def test_bad_study_is_one_line_exit_2(tmp_path, capsys, change, field):
    raw = study_raw()
    for section, value in change.items():
        raw[section] = value if section == "search" else {**raw[section], **value}
    rc = main(["study", "run", str(write(tmp_path, raw)), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"raykd: error: {field}:"), err
    assert not (tmp_path / "runs").exists()


def test_val_metric_needs_a_validation_split(tmp_path, capsys):
    raw = study_raw()
    raw["base"]["data"]["val_per_class"] = 0
    assert main(["study", "run", str(write(tmp_path, raw))]) == 2
    assert "val_per_class" in capsys.readouterr().err


def test_default_ranges_come_from_the_declarations():
    study = parse_config(study_raw(search={"method.lambda_u": "default", "train.lr": "default"}), StudyConfig)
    space = resolve_search(study)
    assert space["method.lambda_u"].kind == "loguniform" and space["method.lambda_u"].args == (0.25, 4.0)
    assert space["train.lr"].args == (0.005, 0.1)
    assert short_names(["method.threshold", "train.lr"]) == {"method.threshold": "threshold", "train.lr": "lr"}
    assert short_names(["model.width", "train.width"]) == {"model.width": "model.width", "train.width": "train.width"}


def test_nested_keys_of_a_set_section_are_searchable():
    """``data.open_set.unseen_fraction`` (a field below a section) resolves, and every bound is validated."""
    raw = study_raw(search={"data.open_set.unseen_fraction": {"uniform": [0.2, 0.8]}})
    raw["base"]["data"]["open_set"] = {"unseen_classes": [8, 9]}
    space = resolve_search(parse_config(raw, StudyConfig))
    assert space["data.open_set.unseen_fraction"].args == (0.2, 0.8)
    raw["search"] = {"data.open_set.unseen_fraction": {"uniform": [0.2, 1.5]}}
    with pytest.raises(ConfigError, match="search.data.open_set.unseen_fraction"):
        resolve_search(parse_config(raw, StudyConfig))
    raw["search"] = {"data.open_set.unseen_fractoin": {"uniform": [0.2, 0.8]}}
    with pytest.raises(ConfigError, match="has no field 'unseen_fractoin'"):
        resolve_search(parse_config(raw, StudyConfig))


def test_ablation_validation(tmp_path, capsys):
    raw = {"name": "a", "base": tiny_base(), "grid": {"method.threshold": [0.5, 2.0]}, "seeds": [0]}
    assert main(["ablate", str(write(tmp_path, raw, "abl.yaml"))]) == 2
    assert capsys.readouterr().err.startswith("raykd: error: grid.method.threshold:")


@pytest.mark.parametrize(("reference", "field"), [({"method.threshold": 0.8}, "reference.method.threshold"),
                                                  ({"train.lr": 0.1}, "reference.train.lr")])  # fmt: skip
def test_an_ablation_reference_must_be_a_grid_cell(tmp_path, capsys, reference, field):
    raw = {"name": "a", "base": tiny_base(), "grid": {"method.threshold": [0.7, 0.95]}, "seeds": [0],
           "reference": reference}  # fmt: skip
    assert main(["ablate", str(write(tmp_path, raw, "abl.yaml"))]) == 2
    assert capsys.readouterr().err.startswith(f"raykd: error: {field}:")


def test_the_default_reference_is_the_base_configs_value_when_the_grid_holds_it():
    from raykd.tune.ablation import reference_cell
    from raykd.tune.config import AblationConfig

    base = tiny_base()
    base["method"]["threshold"] = 0.95
    abl = parse_config({"name": "a", "base": base, "grid": {"method.threshold": [0.7, 0.95]}}, AblationConfig)
    assert reference_cell(abl) == [0.95]
    base["method"]["threshold"] = 0.9  # not in the grid: its first value
    abl = parse_config({"name": "a", "base": base, "grid": {"method.threshold": [0.7, 0.95]}}, AblationConfig)
    assert reference_cell(abl) == [0.7]
    abl = parse_config({"name": "a", "base": base, "grid": {"method.threshold": [0.7, 0.95]},
                        "reference": {"method.threshold": 0.95}}, AblationConfig)  # fmt: skip
    assert reference_cell(abl) == [0.95]


# --------------------------------------------------------------------------------------------
# studies through Ray Tune


@pytest.mark.ray
def test_study_runs_exports_and_the_export_reproduces(tmp_path, ray_local, capsys):
    from raykd.tune import study as study_mod

    storage = tmp_path / "runs"
    rc = main(["study", "run", str(write(tmp_path, study_raw(name="tiny"))), "--storage", str(storage)])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = storage / "tiny"
    assert "best config:" in out and (d / "best.yaml").exists()
    trials = sorted(p.name for p in (d / "trials").iterdir())
    assert len(trials) == 3 and all((d / "trials" / t / "result.json").exists() for t in trials)
    # the Optuna database holds the same three trials, all complete
    ot = optuna.load_study(study_name="tiny", storage=f"sqlite:///{d / 'optuna.db'}")
    assert [t.state.name for t in ot.trials] == ["COMPLETE"] * 3
    assert ot.metric_names == ["val_acc"] and sorted(t.user_attrs["raykd_trial_id"] for t in ot.trials) == trials
    # Ray's own reader opens the same trials without raykd's trainable (docs/studies.md)
    from ray.tune import ExperimentAnalysis

    assert sorted(t.trial_id for t in ExperimentAnalysis(str(d / "tune")).trials) == trials
    assert (d / "study.md").exists() and (d / "history.png").exists()
    # TensorBoard: each trial's events are keyed by the training step; Tune writes none of its own
    from raykd.train.events import read_scalars

    for t in trials:
        steps = [json.loads(line)["step"] for line in (d / "trials" / t / "progress.jsonl").read_text().splitlines()]
        assert [s for s, _ in read_scalars(d / "trials" / t / "tb")["eval/val_acc"]] == steps
    assert not list((d / "tune").rglob("events.out.tfevents.*"))

    status = study_mod.status_text(d)
    assert status.count("done") == 3 and "*" in status
    # what each trial cost (wall × the CPUs it holds) and what its model costs, in its result
    for t in trials:
        result = json.loads((d / "trials" / t / "result.json").read_text())
        assert result["device"] == "CPU" and result["device_s"] == pytest.approx(result["wall_s"] * 1.0, abs=0.01)
        assert result["wall_s"] > 0 and result["params"] > 0 and result["macs"] > 0 and result["latency_ms"] > 0
    assert "spent " in status and "CPU-hours" in status and "CPU-s" in status
    assert "## What the study cost" in (d / "study.md").read_text()

    best = yaml.safe_load((d / "best.yaml").read_text())
    prov = best["provenance"]
    assert prov["study"] == "tiny" and prov["trial_id"] in trials and prov["selected_on"] == "val_acc"
    ranked = rank_trials(collect_trials(d, ["method.threshold", "train.lr"], 4), "val_acc", "max")
    assert prov["trial_id"] == ranked[0]["trial_id"]
    # re-running the exported config (what `raykd train best.yaml` runs) lands on its reported metric
    cfg = parse_run_config(best)
    again = train_loop(cfg, LocalSession(tmp_path / "rerun"), tmp_path / "rerun")
    assert abs(again["val_acc"] - prov["metrics"]["val_acc"]) <= 0.05
    assert abs(again["test_acc"] - prov["metrics"]["test_acc"]) <= 0.05

    assert main(["study", "export", str(d), "--out", str(tmp_path / "b.yaml"), "--top-k", "2"]) == 0
    assert (tmp_path / "b.yaml").exists() and (tmp_path / "b_top2.yaml").exists()
    assert main(["study", "run", str(write(tmp_path, study_raw(name="tiny"))), "--storage", str(storage)]) == 2


@pytest.mark.ray
def test_a_study_stops_starting_trials_once_its_budget_is_spent(tmp_path, ray_local, capsys):
    """tune.budget_hours: the first trial spends the (tiny) budget, no second one starts, the study
    ends with exit 0 and says so; status shows the spend and resume starts nothing new."""
    raw = study_raw(name="budget", num_samples=4, max_concurrent=1, budget_hours=1e-6)
    raw["base"]["train"].update(steps=2, eval_every=2)
    assert main(["study", "run", str(write(tmp_path, raw)), "--storage", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    d = tmp_path / "runs" / "budget"
    started = list(d.glob("trials/*/config.yaml"))
    assert 1 <= len(started) < 4 and (d / "best.yaml").exists()
    assert "budget reached: " in out and f"of 1e-06 CPU-hours; {len(started)} of 4 trials started" in out
    from raykd.tune import study as study_mod

    status = study_mod.status_text(d)
    assert "budget reached" in status and "spent " in status
    assert main(["study", "resume", str(d)]) == 0  # the spend is read back from the trial folders
    assert "budget reached" in capsys.readouterr().out
    assert len(list(d.glob("trials/*/config.yaml"))) == len(started)


def test_a_budget_must_be_positive():
    for bad in (0, -1.0):
        with pytest.raises(ConfigError, match="tune.budget_hours"):
            parse_config(study_raw(budget_hours=bad), StudyConfig)
    assert parse_config(study_raw(budget_hours=0.5), StudyConfig).tune.budget_hours == 0.5


@pytest.mark.ray
def test_ablation_writes_csv_markdown_and_plot(tmp_path, ray_local, capsys):
    raw = {"name": "abl", "base": tiny_base(), "grid": {"method.threshold": [0.6, 0.95]}, "seeds": [0, 1],
           "metric": "test_acc"}  # fmt: skip
    rc = main(["ablate", str(write(tmp_path, raw, "abl.yaml")), "--storage", str(tmp_path / "runs")])
    assert rc == 0, capsys.readouterr()
    d = tmp_path / "runs" / "abl"
    rows = list(csv.DictReader(open(d / "ablation.csv")))
    assert [float(r["method.threshold"]) for r in rows] == [0.6, 0.95]
    assert all(r["n"] == "2" for r in rows)
    assert {"test_acc_mean", "test_acc_std", "mask_rate_mean", "pseudo_acc_mean", "test_acc_at_best_val_mean"} <= set(
        rows[0]
    )
    seeds = {yaml.safe_load((p / "config.yaml").read_text())["data"]["seed"] for p in (d / "trials").iterdir()}
    assert seeds == {0, 1}  # each seed sets the labeled split too
    assert (d / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "±" in (d / "ablation.md").read_text()
    # every cell against the reference (the base's threshold, 0.95, is in the grid), paired by seed
    assert rows[1]["vs_ref_n"] == "reference" and rows[0]["vs_ref_n"] == "2" and rows[0]["vs_ref_verdict"]
    assert "## Paired against method.threshold = 0.95" in (d / "ablation.md").read_text()
    assert main(["report", str(d)]) == 0


@pytest.mark.ray
def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path):
    raw = study_raw(name="killme", num_samples=4, max_concurrent=1)
    raw["base"]["train"].update(steps=6, eval_every=2)
    path = write(tmp_path, raw)
    storage = tmp_path / "runs"
    d = storage / "killme"
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "raykd.cli", "study", "run", str(path), "--storage", str(storage)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(list(d.glob("trials/*/result.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    time.sleep(2)  # let Tune save its experiment state once more
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, as a crash would
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in d.glob("trials/*/result.json")}
    assert 2 <= len(finished) < 4

    res = run_cli(["study", "resume", str(d)], timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(finished)} finished trial(s) kept" in res.stdout
    results = list(d.glob("trials/*/result.json"))
    assert len(results) == 4  # num_samples reached
    for p in results:  # finished trials were not re-run: their results are untouched
        if p.parent.name in finished:
            assert p.stat().st_mtime_ns == finished[p.parent.name]
        steps = [json.loads(x)["step"] for x in (p.parent / "progress.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), steps  # no trial started over
    ot = optuna.load_study(study_name="killme", storage=f"sqlite:///{d / 'optuna.db'}")
    complete = [t for t in ot.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4


@pytest.mark.ray
def test_asha_stops_two_worker_train_in_tune_trials_without_hanging(tmp_path):
    """ASHA stops Train-in-Tune trials (2 DDP workers each); their placement groups must be freed or
    the next trial never starts (docs/architecture.md, "Ray facts the design rests on").  The study must finish."""
    # TPE seed 11 suggests lr 0.05, then 1e-6 twice; with the same initialisation and data, a 1e-6 trial's
    # training loss over the first window is strictly higher, so ASHA stops it at the first rung.
    tune = {"num_samples": 3, "max_concurrent": 1, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2}
    raw = study_raw(name="asha", search={"train.lr": {"choice": [0.05, 1e-6]}}, metric="loss", mode="min", seed=11,
                    **tune)  # fmt: skip
    raw["base"]["train"].update(steps=6, eval_every=2)
    raw["base"]["scaling"]["num_workers"] = 2
    res = run_cli(["study", "run", str(write(tmp_path, raw)), "--storage", str(tmp_path / "runs")], timeout=540)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stopped early by the scheduler" in res.stdout, res.stdout
    d = tmp_path / "runs" / "asha"
    assert len(list(d.glob("trials/*/config.yaml"))) == 3
    assert any((p / "train").is_dir() for p in (d / "trials").iterdir())  # Train-in-Tune checkpoints


@pytest.mark.ray
def test_study_trains_the_teacher_once_for_all_trials(tmp_path, ray_local, capsys):
    base = tiny_run_config("kd", train={"steps": 4, "eval_every": 2}).model_dump(mode="json", exclude={"provenance"})
    raw = {"name": "kdstudy", "base": base, "search": {"method.temperature": "default", "method.alpha": "default"},
           "tune": {"num_samples": 3, "scheduler": "none", "max_concurrent": 2}}  # fmt: skip
    rc = main(["study", "run", str(write(tmp_path, raw)), "--storage", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = tmp_path / "runs" / "kdstudy"
    teachers = list((d / "teachers").glob("teacher-*/"))
    assert len(teachers) == 1 and out.count("teacher: training it first") == 1
    steps = [json.loads(x)["step"] for x in (teachers[0] / "progress.jsonl").read_text().splitlines()]
    assert steps == [20]  # one training run of the teacher, not one per trial
    assert "teacher: step 20/20" in out  # the teacher's progress lines say whose they are
    assert len(list(d.glob("trials/*/result.json"))) == 3
    assert main(["study", "resume", str(d)]) == 0  # resuming finds the cached teacher
    assert "teacher: training it first" not in capsys.readouterr().out


@pytest.mark.ray
def test_ablation_trains_one_teacher_per_seed_on_that_seeds_split(tmp_path, ray_local, capsys):
    base = tiny_run_config("kd", train={"steps": 2, "eval_every": 2}).model_dump(mode="json", exclude={"provenance"})
    raw = {"name": "kdabl", "base": base, "grid": {"method.alpha": [0.5]}, "seeds": [0, 1], "metric": "test_acc"}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["ablate", str(path), "--storage", str(tmp_path / "runs")]) == 0
    d = tmp_path / "runs" / "kdabl"
    seeds = {}
    for folder in (d / "teachers").glob("teacher-*/"):
        tcfg = yaml.safe_load((folder / "config.yaml").read_text())
        seeds[tcfg["data"]["seed"]] = tcfg["train"]["seed"]
    assert seeds == {0: 0, 1: 1}  # one teacher per seed, trained on the seed's own labeled split
    for cfg_file in d.glob("trials/*/config.yaml"):
        cfg = yaml.safe_load(cfg_file.read_text())
        assert cfg["teacher"]["run"]["data"]["seed"] == cfg["data"]["seed"]
