"""The training loop and ``raykd train``: resume, run folders, and FixMatch beating supervised under
2-worker DDP through Ray Train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raykd.cli import main
from raykd.testing import flat_state, tiny_run_config
from raykd.train.context import LocalSession
from raykd.train.loop import lr_at, param_groups, train_loop

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "studies" / "quickstart_run.yaml"


def final_state(cfg, run_dir, stop_at=None, session=None):
    out = {}
    session = session or LocalSession(run_dir)
    train_loop(cfg, session, run_dir, stop_at=stop_at, on_end=lambda ctx, m: out.update(w=flat_state(ctx.raw_model)))
    return out.get("w"), session


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path):
    cfg = tiny_run_config("fixmatch", train={"steps": 6, "eval_every": 2})
    straight, _ = final_state(cfg, tmp_path / "a")

    _, first = final_state(cfg, tmp_path / "b", stop_at=4)
    assert [r["step"] for r in first.reports] == [2, 4]
    resumed, second = final_state(cfg, tmp_path / "b")
    assert [r["step"] for r in second.reports] == [6]  # continued from the step-4 checkpoint
    assert torch.equal(resumed, straight)  # sampling and augmentation resume exactly


def test_cosine_schedule_and_weight_decay_groups():
    cfg = tiny_run_config("supervised", train={"steps": 16, "lr": 0.1})
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 16) == pytest.approx(0.1 * torch.cos(torch.tensor(7 * torch.pi / 16)).item())
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 2))
    decay, no_decay = param_groups([model], 5e-4)
    assert {p.ndim for p in decay["params"]} == {4, 2} and decay["weight_decay"] == 5e-4
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0


# --------------------------------------------------------------------------------------------
# through Ray Train


@pytest.mark.ray
def test_ray_train_run_resumes_from_its_checkpoint(tmp_path, ray_local):
    from raykd.train.trainer import run_training

    cfg = tiny_run_config("fixmatch", train={"steps": 6, "eval_every": 2})
    first = run_training(cfg, tmp_path, stop_at=4)
    assert first["step"] == 4 and not (tmp_path / "result.json").exists()
    second = run_training(cfg, tmp_path)
    assert second["step"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # the second run started at the step-4 checkpoint, not at 0
    from raykd.train.events import read_scalars

    assert [s for s, _ in read_scalars(tmp_path / "tb")["eval/test_acc"]] == steps  # rank 0's events, by step
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 6


@pytest.mark.ray
def test_two_worker_fixmatch_through_raykd_train_beats_supervised(tmp_path):
    """A new user's command: 2 DDP workers (gloo), global batch unchanged, FixMatch > supervised."""
    steps = 300
    out = tmp_path / "fixmatch"
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "raykd.cli", "train", str(QUICKSTART), "--out", str(out),
         "--set", "scaling.num_workers=2", "--set", f"train.steps={steps}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"step {steps}/{steps}" in proc.stdout and "mask" in proc.stdout  # live progress lines
    result = json.loads((out / "result.json").read_text())
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["scaling"]["num_workers"] == 2 and resolved["train"]["steps"] == steps
    assert result["world_size"] == 2 and result["global_batch"] == resolved["train"]["batch_size"]
    assert result["global_ubatch"] == resolved["train"]["batch_size"] * resolved["train"]["uratio"]
    assert 0.0 < result["mask_rate"] <= 1.0

    resolved["method"] = {"name": "supervised"}
    resolved["scaling"]["num_workers"] = 1
    from raykd.config import parse_run_config

    supervised = train_loop(parse_run_config(resolved), LocalSession(tmp_path / "sup"), tmp_path / "sup")
    assert result["test_acc"] > supervised["test_acc"] + 0.03, (result["test_acc"], supervised["test_acc"])


def test_out_folder_of_a_finished_run_is_refused(tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "result.json").write_text("{}")
    rc = main(["train", str(QUICKSTART), "--out", str(out)])
    assert rc == 2
    assert "finished run" in capsys.readouterr().err


def test_out_folder_with_a_different_config_is_refused(tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 1}}))
    rc = main(["train", str(QUICKSTART), "--out", str(out)])
    assert rc == 2
    assert "different run" in capsys.readouterr().err


def test_event_files_are_keyed_by_the_training_step_and_survive_a_restart(tmp_path):
    from raykd.train.events import read_scalars

    cfg = tiny_run_config("fixmatch", train={"steps": 6, "eval_every": 2})
    run_dir = tmp_path / "run"
    final_state(cfg, run_dir, stop_at=4)
    first = read_scalars(run_dir / "tb")
    assert [s for s, _ in first["train/loss"]] == [2, 4]
    assert {"train/lr", "train/img_per_s", "train/mask_rate", "eval/test_acc"} <= set(first)
    lr = dict(first["train/lr"])
    assert lr[2] == pytest.approx(lr_at(cfg, 1)) and lr[4] == pytest.approx(lr_at(cfg, 3))

    shutil.rmtree(run_dir / "checkpoints" / "step_000000004")  # the restart goes back to step 2
    _, second = final_state(cfg, run_dir)
    assert [r["step"] for r in second.reports] == [4, 6]
    files = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2  # one file per start
    scalars = read_scalars(run_dir / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]  # step 4 of the first start purged, not doubled
    assert [s for s, _ in scalars["eval/test_acc"]] == [2, 4, 6]
    progress = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert dict(scalars["eval/test_acc"]) == pytest.approx({r["step"]: r["test_acc"] for r in progress})

    off = tiny_run_config("fixmatch", train={"steps": 2, "eval_every": 2, "tensorboard": False})
    final_state(off, tmp_path / "off")
    assert not (tmp_path / "off" / "tb").exists()
