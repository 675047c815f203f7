"""Multi-objective studies: without Ray, the Pareto set of hand-made trial values (dominance, ties,
what is never a candidate), study.md's Pareto section and pareto.png, export --pareto, and the
refusal of ASHA with several objectives; with Ray, a study end to end whose Pareto exports re-run to
their recorded metrics."""

from __future__ import annotations

import json

import pytest
import yaml

from raykd import report
from raykd.cli import main
from raykd.config import parse_config
from raykd.testing import tiny_run_config
from raykd.train.runfolder import RunFolder
from raykd.tune.config import StudyConfig

OBJ = [("val_acc", "max"), ("params", "min")]


def rec(tid, val_acc, params, state="done"):
    return {"trial_id": tid, "state": state, "params": {"model.width": params // 100},
            "metrics": {"val_acc": val_acc, "params": params}, "history": []}  # fmt: skip


def test_pareto_set_of_hand_made_values():
    records = [
        rec("a", 0.90, 4000),  # the most accurate
        rec("b", 0.80, 1000),  # the smallest
        rec("c", 0.80, 2000),  # dominated by b (same accuracy, larger)
        rec("d", 0.85, 2000),  # between a and b: on the front
        rec("e", 0.85, 2000),  # ties d on both: both on the front
        rec("f", 0.70, 3000),  # dominated by all of a, b, d
        rec("g", 0.99, 500, state="stopped"),  # not finished: never a candidate (it dominates nothing)
        rec("h", float("nan"), 100),  # no finite value: never a candidate
        rec("i", 0.95, 100, state="failed"),
    ]
    assert [records[i]["trial_id"] for i in report.pareto_indices(records, OBJ)] == ["a", "b", "d", "e"]
    assert report.pareto_indices(records, [("val_acc", "max")]) == [0]  # one objective: the best
    both_max = report.pareto_indices(records, [("val_acc", "max"), ("params", "max")])
    assert [records[i]["trial_id"] for i in both_max] == ["a"]  # a is the most accurate and the largest
    with pytest.raises(ValueError):
        report.pareto_indices(records, [("val_acc", "up")])


def test_study_md_has_the_pareto_set_and_pareto_png(tmp_path):
    records = [rec("a", 0.9, 4000), rec("b", 0.8, 1000), rec("c", 0.7, 3000)]
    paths = report.write_study_report(records, ["model.width"], "val_acc", "max", tmp_path, objectives=OBJ)
    text = (tmp_path / "study.md").read_text()
    assert "## Pareto set (val_acc max, params min)" in text and "| c |" not in text.split("## Pareto set")[1]
    assert paths["pareto"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.axis_label("params", "min") == "params (parameters, lower is better)"


def _mo_study_folder(tmp_path):
    base = tiny_run_config("fixmatch", train={"steps": 4, "eval_every": 2})
    raw = {"name": "mo", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"model.width": {"int": [2, 8]}},
           "tune": {"objectives": [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}],
                    "scheduler": "none", "num_samples": 3}}  # fmt: skip
    d = tmp_path / "mo"
    (d / "trials").mkdir(parents=True)
    (d / "study.yaml").write_text(yaml.safe_dump(raw))
    for tid, width, acc, params in (("t1", 8, 0.9, 4000), ("t2", 2, 0.8, 1000), ("t3", 4, 0.7, 2000)):
        folder = RunFolder(d / "trials" / tid)
        folder.write_config(parse_config({**raw["base"], "model": {**raw["base"]["model"], "width": width}},
                                         type(base)))  # fmt: skip
        folder.write_result({"step": 4, "val_acc": acc, "test_acc": acc, "params": params})
    return d, raw


def test_export_pareto_writes_one_config_per_pareto_trial(tmp_path, capsys):
    d, raw = _mo_study_folder(tmp_path)
    study = parse_config(raw, StudyConfig)
    assert study.tune.metric == "val_acc" and study.tune.metrics == ["val_acc", "params"]
    out = tmp_path / "pareto"
    assert main(["study", "export", str(d), "--pareto", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["t1.yaml", "t2.yaml"]
    prov = yaml.safe_load((out / "t2.yaml").read_text())["provenance"]
    assert prov["pareto"] and prov["metrics"]["params"] == 1000 and prov["trial_id"] == "t2"
    assert main(["study", "export", str(d), "--pareto", "--out", str(out)]) == 0  # its own exports: replaced
    (tmp_path / "f.yaml").write_text("x: 1\n")
    assert main(["study", "export", str(d), "--pareto", "--out", str(tmp_path / "f.yaml")]) == 2
    assert main(["report", str(d)]) == 0 and (d / "pareto.png").exists()
    capsys.readouterr()
    single = json.loads(json.dumps(raw))
    single["tune"] = {"metric": "val_acc", "scheduler": "none"}
    (d / "study.yaml").write_text(yaml.safe_dump(single))
    assert main(["study", "export", str(d), "--pareto", "--out", str(out)]) == 2
    assert "tune.objectives" in capsys.readouterr().err


def test_asha_with_several_objectives_is_refused_before_ray(tmp_path, capsys):
    d, raw = _mo_study_folder(tmp_path)
    raw["tune"]["scheduler"] = "asha"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["study", "run", str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raykd: error: tune.scheduler: ASHA"), err
    assert not (tmp_path / "runs").exists()
    raw["tune"]["objectives"][1]["metric"] = "parms"
    raw["tune"]["scheduler"] = "none"
    path.write_text(yaml.safe_dump(raw))
    assert main(["study", "run", str(path), "--storage", str(tmp_path / "runs")]) == 2
    assert "tune.objectives.1.metric" in capsys.readouterr().err


@pytest.mark.ray
def test_a_multi_objective_study_runs_and_its_pareto_exports_rerun(tmp_path, ray_local, capsys):
    """Through Ray Tune and Optuna's multi-objective TPE: every trial is COMPLETE with both values,
    Optuna's Pareto front is raykd's Pareto set, and each exported config re-runs to its recorded
    metrics (the run is seeded: the same config gives the same numbers)."""
    import optuna

    from raykd.testing import tiny_run_config
    from raykd.train.context import LocalSession
    from raykd.train.loop import train_loop

    base = tiny_run_config("supervised", data={"val_per_class": 2}, train={"steps": 4, "eval_every": 2})
    objectives = [{"metric": "val_acc", "mode": "max"}, {"metric": "params", "mode": "min"}]
    raw = {"name": "mo", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"model.width": {"choice": [2, 4, 8]}},
           "tune": {"num_samples": 3, "scheduler": "none", "max_concurrent": 1, "objectives": objectives}}  # fmt: skip
    path = tmp_path / "mo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["study", "run", str(path), "--storage", str(tmp_path / "runs")]) == 0, capsys.readouterr()
    d = tmp_path / "runs" / "mo"
    ot = optuna.load_study(study_name="mo", storage=f"sqlite:///{d / 'optuna.db'}")
    assert [t.state.name for t in ot.trials] == ["COMPLETE"] * 3 and all(len(t.values) == 2 for t in ot.trials)
    front = sorted(t.user_attrs["raykd_trial_id"] for t in ot.best_trials)
    out = tmp_path / "pareto"
    assert main(["study", "export", str(d), "--pareto", "--out", str(out)]) == 0
    assert sorted(p.stem for p in out.glob("*.yaml")) == front
    for exported in sorted(out.glob("*.yaml")):
        cfg = yaml.safe_load(exported.read_text())
        recorded = cfg["provenance"]["metrics"]
        rerun = tmp_path / exported.stem
        again = train_loop(parse_config(cfg, type(base)), LocalSession(rerun), rerun)
        assert again["val_acc"] == pytest.approx(recorded["val_acc"], abs=1e-6), exported.name
        assert RunFolder(rerun).result()["params"] == recorded["params"]
