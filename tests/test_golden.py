"""Golden values: one seeded training step of every registered method on a fixed tiny batch.

The loss, the method's logs and the test accuracy after two steps (digits, small_cnn width 8, a
batch of 8 labeled + 16 unlabeled images, train.seed 0) are compared with ``golden/train_step.json``.
A refactoring that leaves the algorithms alone keeps every number; a change to a method's maths fails
here, naming the method and the value.  To re-record after an intended change::

    RAYKD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and say why in the commit.  Tolerance: relative 1e-5 (one thread on CPU is deterministic; the
margin absorbs a different BLAS kernel on another CPU).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from raykd.methods import METHODS
from raykd.testing import tiny_run_config, tiny_teacher
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop

GOLDEN = Path(__file__).parent / "golden" / "train_step.json"
UPDATE = os.environ.get("RAYKD_UPDATE_GOLDEN") == "1"
#: what every run reports besides its method's logs
LOOP_KEYS = {"step", "epoch", "lr", "loss", "img_per_s", "global_batch", "global_ubatch", "world_size", "test_acc",
             "best_test_acc", "val_acc", "best_val_acc", "test_acc_at_best_val", "evaluated"}  # fmt: skip


#: knobs that open the unlabeled paths of a barely trained model (default thresholds would mask everything)
KNOBS = {
    "fixmatch": {"threshold": 0.105},
    "kd_fixmatch": {"threshold": 0.105, "tau_hc": 0.1},
    "layermatch": {"threshold": 0.105, "avg_threshold": 0.105, "avg_momentum": 0.5},
}


def one_step(method: str, root: Path) -> dict:
    """Two seeded steps (the second sees the state the first left), evaluated on the raw weights."""
    cfg = tiny_run_config(method, method=KNOBS.get(method, {}), train={"steps": 2, "eval_every": 2, "ema": 0.0})
    run_dir = root / method
    metrics = train_loop(cfg, LocalSession(run_dir), run_dir, teacher_dir=tiny_teacher(cfg, root / "teachers"))
    return {k: v for k, v in metrics.items() if isinstance(v, float) and k not in ("img_per_s", "lr")}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    if UPDATE:
        root = tmp_path_factory.mktemp("golden")
        values = {m: one_step(m, root) for m in METHODS.names()}
        GOLDEN.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("method", METHODS.names())
def test_one_step_matches_golden_values(method, golden, tmp_path):
    assert method in golden, f"no golden values for {method}: record them (see this module's docstring)"
    got = one_step(method, tmp_path)
    want = golden[method]
    assert sorted(got) == sorted(want), f"{method} reports other values than recorded"
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), f"{method}.{key}"
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{method}.{key}"
