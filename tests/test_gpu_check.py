"""The GPU check's CPU smoke form (``benchmarks/gpu_check.sh --device cpu --tiny``), so that the
command a GPU node runs never rots: it writes the JSON report with every section and the Markdown
tables, and its 2-trial ``raykd study run`` succeeds (its ``raykd train`` of the same base config is
left out here to save a Ray start; ``tests/test_train.py`` covers the command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_tiny_cpu_gpu_check_writes_the_report(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--windows", "1",
           "--skip", "compile", "train", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert {"command", "date", "environment", "steps", "augment", "ray", "wall_s"} <= set(report)
    assert {"device", "torch", "cuda", "cudnn", "nvidia_smi", "gpu", "cpus"} <= set(report["environment"])
    step = report["steps"][0]
    assert step["variant"] == "eager fp32" and step["model"] == "small_cnn"
    for key in ("plain_img_s", "raykd_img_s", "ratio_raykd_over_plain", "raykd_step_ms", "hours_for_2^20_steps"):
        assert step[key] > 0, key
    assert {r["mode"] for r in report["augment"]} == {"sync-free (CUDA default)", "sorted chunks (CPU default)"}
    assert set(report["ray"]) == {"study"}  # raykd train is left out here (one Ray start less; same config)
    assert report["ray"]["study"]["rc"] == 0 and report["ray"]["study"]["wall_s"] > 0

    md = (out / "gpu_check.md").read_text()
    assert "| variant | steps measured | plain img/s | raykd img/s |" in md
    assert "| eager fp32 |" in md and "Projected: 1048576 steps take" in md
    assert "| raykd study |" in md
