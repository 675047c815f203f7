"""What raykd does when things go wrong: divergence, a second driver, corrupt checkpoints, unreadable
trial files, a lost Optuna database, Ctrl-C.  Most run without Ray; the ones marked ``ray`` drive a
real study or run through Ray (one Ray start serves the in-process ones)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from raykd.cli import main
from raykd.testing import tiny_run_config
from raykd.train.context import LocalSession
from raykd.train.loop import divergence, train_loop
from raykd.train.runfolder import RunFolder
from raykd.tune.lock import StudyLock

ENV = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raykd.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)  # fmt: skip


# --------------------------------------------------------------------------------------------
# divergence


def test_divergence_rule_on_hand_made_metrics():
    assert divergence({"loss": 2.3}, 1e6) is None
    assert divergence({"loss": float("nan")}, 1e6) == "loss is nan"
    assert divergence({"loss": float("inf")}, None) == "loss is inf"
    assert "above train.divergence_loss" in divergence({"loss": 1e16}, 1e6)
    assert divergence({"loss": 1e16}, None) is None  # the bound can be switched off, non-finite cannot
    assert divergence({"loss": 1.0, "val_acc": float("nan")}, 1e6, watched=("val_acc",)) == "val_acc is nan"
    assert divergence({"loss": 1.0, "val_acc": float("nan")}, 1e6) is None


def test_a_diverging_run_stops_at_its_first_evaluation_and_records_why(tmp_path):
    cfg = tiny_run_config("fixmatch", train={"steps": 40, "eval_every": 4, "lr": 1e5, "lr_schedule": "constant"})
    metrics = train_loop(cfg, LocalSession(tmp_path), tmp_path)
    folder = RunFolder(tmp_path)
    failure = folder.failure()
    assert failure is not None and metrics["diverged"] == failure["reason"]
    assert failure["step"] == metrics["step"] < 40 and failure["step"] % 4 == 0
    assert not folder.result_path.exists()
    assert folder.status({}) == ("failed", f"at step {failure['step']}: {failure['reason']}")
    # strict JSON everywhere: the NaN loss is null in failed.json and every progress line parses
    json.loads(folder.failure_path.read_text())
    for line in folder.progress_path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# --------------------------------------------------------------------------------------------
# one driver per study


def test_a_second_driver_is_refused_at_once_and_a_dead_one_leaves_no_stuck_lock(tmp_path, capsys):
    d = tmp_path / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from raykd.tune.lock import StudyLock; "
                               f"StudyLock({str(d)!r}).acquire('study'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        raw = {"name": "locked", "base": tiny_run_config("fixmatch").model_dump(mode="json", exclude={"provenance"}),
               "search": {"method.threshold": {"uniform": [0.7, 0.9]}}, "tune": {"metric": "val_acc"}}  # fmt: skip
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(raw))
        t0 = time.time()
        assert main(["study", "run", str(path), "--storage", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert time.time() - t0 < 10 and err.count("\n") == 1
        assert "is running already" in err and f"pid {holder.pid}" in err
        assert StudyLock(d).holder() is not None
    finally:
        holder.kill()
        holder.wait()
    assert StudyLock(d).holder() is None  # the kernel dropped the lock with the process


# --------------------------------------------------------------------------------------------
# corrupt checkpoints and unreadable files


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    cfg = tiny_run_config("fixmatch", train={"steps": 6, "eval_every": 2, "keep_checkpoints": 3})
    train_loop(cfg, LocalSession(tmp_path, keep=3), tmp_path, stop_at=4)
    steps = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [s.name for s in steps] == ["step_000000002", "step_000000004"]
    bad = steps[-1] / "state.pt"
    bad.write_bytes(bad.read_bytes()[:100])  # what a full disk or a killed writer leaves
    metrics = train_loop(cfg, LocalSession(tmp_path, keep=3), tmp_path)
    assert metrics["step"] == 6
    err = capsys.readouterr().err
    assert str(bad) in err and "unreadable" in err
    steps_seen = [row["step"] for row in RunFolder(tmp_path).progress()]
    assert steps_seen == [2, 4, 6]  # resumed from step 2; step 4 is recorded once, not twice


def _hand_made_study(tmp_path, n=3):
    base = tiny_run_config("fixmatch", train={"steps": 4, "eval_every": 2})
    d = tmp_path / "study"
    raw = {"name": "study", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"method.threshold": {"uniform": [0.7, 0.99]}},
           "tune": {"num_samples": n, "metric": "val_acc", "scheduler": "none"}}  # fmt: skip
    d.mkdir()
    (d / "study.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for i in range(n):
        run = RunFolder(d / "trials" / f"t{i}")
        cfg = base.model_copy(deep=True)
        cfg.method.threshold = 0.7 + 0.1 * i
        run.write_config(cfg)
        rec = {"step": 4, "epoch": 2, "val_acc": 0.5 + 0.1 * i, "test_acc": 0.5}
        run.append_progress({**rec, "step": 2})
        run.append_progress(rec)
        run.write_result(rec)
    return d


def test_unreadable_trial_files_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    d = _hand_made_study(tmp_path)
    (d / "trials" / "t2" / "result.json").write_text('{"step": 4, "val_ac')  # truncated by a crash
    with open(d / "trials" / "t1" / "progress.jsonl", "a") as f:
        f.write('{"step": 6, "val')  # a half-written last line
    assert main(["study", "status", str(d)]) == 0
    captured = capsys.readouterr()
    assert str(d / "trials" / "t2" / "result.json") in captured.err
    assert str(d / "trials" / "t1" / "progress.jsonl") in captured.err
    assert "t2" in captured.out and "interrupted" in captured.out  # unreadable result: not finished
    assert main(["study", "export", str(d), "--out", str(tmp_path / "best.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["provenance"]["trial_id"] == "t1"


def test_resume_without_optuna_db_rebuilds_a_finished_study_and_refuses_an_unfinished_one(tmp_path, capsys):
    d = _hand_made_study(tmp_path)
    (d / "tune").mkdir()
    (d / "tune" / "tuner.pkl").write_bytes(b"not read: the checks come first")
    os.chmod(d / "tune" / "tuner.pkl", 0o600)
    assert main(["study", "resume", str(d)]) == 0  # all 3 trials ended: nothing to resume, db rebuilt
    ot = optuna.load_study(study_name="study", storage=f"sqlite:///{d / 'optuna.db'}")
    assert [t.state.name for t in ot.trials] == ["COMPLETE"] * 3
    assert sorted(t.user_attrs["raykd_trial_id"] for t in ot.trials) == ["t0", "t1", "t2"]
    assert ot.metric_names == ["val_acc"] and ot.best_trial.value == pytest.approx(0.7)
    capsys.readouterr()

    (d / "optuna.db").unlink()
    (d / "trials" / "t2" / "result.json").unlink()  # now one trial is unfinished
    assert main(["study", "resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raykd: error: {d / 'optuna.db'}: is missing") and err.count("\n") == 1


def test_resume_refuses_pickles_that_others_can_write(tmp_path, capsys):
    d = _hand_made_study(tmp_path)
    (d / "tune").mkdir()
    pkl = d / "tune" / "tuner.pkl"
    pkl.write_bytes(b"x")
    os.chmod(pkl, 0o666)
    (d / "trials" / "t2" / "result.json").unlink()
    optuna.create_study(study_name="study", storage=f"sqlite:///{d / 'optuna.db'}")
    assert main(["study", "resume", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(pkl) in err and "writable by group or others" in err
    # the experiment state embeds cloudpickle payloads Tune decodes on restore; a trial's pickles; their folders
    os.chmod(pkl, 0o600)
    for path in (d / "tune" / "experiment_state-2026.json", d / "tune" / "t2" / "params.pkl"):
        path.parent.mkdir(exist_ok=True)
        os.chmod(path.parent, 0o700)
        path.write_text("{}")
        os.chmod(path, 0o664)
        assert main(["study", "resume", str(d)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"raykd: error: {path}: is writable by group or others"), err
        os.chmod(path, 0o600)
    os.chmod(d / "tune" / "t2", 0o777)
    assert main(["study", "resume", str(d)]) == 2
    assert capsys.readouterr().err.startswith(f"raykd: error: {d / 'tune' / 't2'}: is writable by group")


# --------------------------------------------------------------------------------------------
# through Ray


@pytest.mark.ray
def test_diverged_trials_fail_in_tune_and_optuna_are_never_exported_and_the_study_goes_on(tmp_path, ray_local,
                                                                                         capsys):  # fmt: skip
    base = tiny_run_config("fixmatch", train={"steps": 4, "eval_every": 2, "lr_schedule": "constant"})
    raw = {"name": "nan", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"train.lr": {"choice": [1.0e5, 0.03]}},
           "tune": {"num_samples": 4, "metric": "val_acc", "scheduler": "none", "seed": 0,
                    "max_failures": 1}}  # fmt: skip
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = main(["study", "run", str(path), "--storage", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert rc == 0, out
    d = tmp_path / "runs" / "nan"
    lrs = {p.parent.name: yaml.safe_load(p.read_text())["train"]["lr"] for p in d.glob("trials/*/config.yaml")}
    assert sorted(set(lrs.values())) == [0.03, 1.0e5], lrs  # the seed makes TPE try both
    diverged = {t for t, lr in lrs.items() if lr == 1.0e5}
    for t in diverged:
        assert RunFolder(d / "trials" / t).failure() is not None
        assert f"trial {t} failed: diverged at step 2" in out
    ot = optuna.load_study(study_name="nan", storage=f"sqlite:///{d / 'optuna.db'}")
    by_id = {t.user_attrs["raykd_trial_id"]: t for t in ot.trials}
    assert set(by_id) == set(lrs) and ot.metric_names == ["val_acc"]
    for t, trial in by_id.items():
        if t in diverged:
            assert trial.state.name == "FAIL" and trial.user_attrs["raykd_state"] == "failed"
            assert "loss" in trial.user_attrs["raykd_failure"]
        else:
            assert trial.state.name == "COMPLETE" and trial.user_attrs["raykd_state"] == "done"
            assert trial.user_attrs["step"] == 4 and "test_acc" in trial.user_attrs
    best = yaml.safe_load((d / "best.yaml").read_text())["provenance"]["trial_id"]
    assert best not in diverged
    assert main(["study", "status", str(d)]) == 0
    status = capsys.readouterr().out
    assert status.count("failed") >= len(diverged)


# --------------------------------------------------------------------------------------------
# Ctrl-C: a subprocess driver gets SIGINT (as a terminal sends it, to its whole process group); the
# resume runs in this process, on the shared Ray


def _ctrl_c_once(argv: list[str], ready, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``raykd ARGV`` in its own process group, SIGINT that group once ``ready()`` is true;
    returns the finished process and when the signal went."""
    proc = subprocess.Popen([sys.executable, "-m", "raykd.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                out, err = proc.communicate()
                pytest.fail(f"not ready (rc {proc.returncode}):\n{out}\n{err}")
            time.sleep(0.1)
        sent = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), sent


def _steps(run_dir) -> list[int]:
    return [row["step"] for row in RunFolder(run_dir).progress()]


@pytest.mark.ray
def test_ctrl_c_on_train_exits_130_with_the_resume_command_and_the_rerun_resumes(tmp_path, ray_local, capsys):
    cfg = tiny_run_config("fixmatch", train={"steps": 40, "eval_every": 10, "lr_schedule": "constant"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"provenance"})))
    out = tmp_path / "out"
    folder = RunFolder(out)
    # a row, and its checkpoint copied into train/: then the rerun must not start from step 0
    res, sent = _ctrl_c_once(["train", str(path), "--out", str(out)],
                             lambda: folder.last_step() is not None and bool(folder.state_files()))  # fmt: skip
    assert res.returncode == 130, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [f"interrupted; resume with: raykd train {path} --out {out}"]
    assert not folder.result_path.exists() and _steps(out)[-1] < 40, "the run ended before the signal"

    assert main(["train", str(path), "--out", str(out)]) == 0
    assert "resuming from its latest intact checkpoint" in capsys.readouterr().out
    rows = RunFolder(out).progress()
    kept = [r["step"] for r in rows if r["time"] < sent]
    again = [r["step"] for r in rows if r["time"] > sent]
    assert kept and kept == [10 * i for i in range(1, len(kept) + 1)], rows  # resumed from a checkpoint, not step 0
    assert [r["step"] for r in rows] == [10, 20, 30, 40]  # every evaluation once: none redone twice, none lost
    assert again[0] == kept[-1] + 10


@pytest.mark.ray
def test_ctrl_c_on_study_run_exports_nothing_and_study_resume_finishes_it(tmp_path, ray_local, capsys):
    base = tiny_run_config("fixmatch", train={"steps": 40, "eval_every": 10})
    raw = {"name": "ctrlc", "base": base.model_dump(mode="json", exclude={"provenance"}),
           "search": {"method.threshold": {"uniform": [0.7, 0.99]}},
           "tune": {"num_samples": 3, "max_concurrent": 1, "metric": "val_acc", "scheduler": "none"}}  # fmt: skip
    path = tmp_path / "ctrlc.yaml"
    path.write_text(yaml.safe_dump(raw))
    d = tmp_path / "runs" / "ctrlc"
    res, _ = _ctrl_c_once(["study", "run", str(path), "--storage", str(tmp_path / "runs")],
                          lambda: any(RunFolder(p).progress() for p in d.glob("trials/*")))  # fmt: skip
    assert res.returncode == 130, res.stdout + res.stderr
    assert f"interrupted; resume with: raykd study resume {d}" in res.stderr.splitlines()
    assert not (d / "best.yaml").exists()  # nothing exported as if the study had finished
    started = sorted(p.name for p in d.glob("trials/*"))
    assert started and len(list(d.glob("trials/*/result.json"))) < 3

    assert main(["study", "status", str(d)]) == 0
    status = capsys.readouterr().out
    unfinished = [t for t in started if not (d / "trials" / t / "result.json").exists()]
    for t in unfinished:
        assert any(t in line.split() and "interrupted" in line.split() for line in status.splitlines()), status
    assert f"study resume {d}" in status

    before = {t: RunFolder(d / "trials" / t).progress() for t in unfinished}
    assert main(["study", "resume", str(d)]) == 0
    assert len(list(d.glob("trials/*/result.json"))) == 3 and (d / "best.yaml").exists()
    for t, rows in before.items():
        if len(rows) >= 2:  # its first checkpoint was surely recorded: continued from a checkpoint, not step 0
            assert RunFolder(d / "trials" / t).progress()[0] == rows[0]
    for t in d.glob("trials/*"):
        assert _steps(t) == [10, 20, 30, 40], t  # the interrupted trial continued; no evaluation twice
    ot = optuna.load_study(study_name="ctrlc", storage=f"sqlite:///{d / 'optuna.db'}")
    assert sorted(t.state.name for t in ot.trials) == ["COMPLETE"] * 3
