"""Tune overhead: the same trials inside a study vs as plain ``raykd train`` calls.

For 1-worker trials (run inline in the Tune trial process) and 2-worker trials (Train-in-Tune, DDP),
this runs a study of N trials one at a time (``max_concurrent: 1``, no early stopping) and then the
same N configs with ``raykd train``, one after the other, each as a user would (a fresh process and
a fresh local Ray per call).  It prints wall times and the ratio study / sum of train calls.  Target:
≤ 1.10 for trials of ≥ 60 s.

    python benchmarks/study_overhead.py                    # ~60 s trials, 2 trials per mode
    python benchmarks/study_overhead.py --steps 300 --trials 2 --modes 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def base_config(steps: int, workers: int) -> dict:
    return {
        "data": {"name": "digits", "labels_per_class": 4, "val_per_class": 5, "seed": 0},
        "model": {"name": "small_cnn"},
        "method": {"name": "fixmatch"},
        "train": {"steps": steps, "batch_size": 32, "uratio": 7, "eval_every": max(1, steps // 4), "seed": 0},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
    }


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def loop_seconds(run_dir: Path) -> float:
    """Seconds between the run's first and last evaluation records (training only)."""
    recs = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    return recs[-1]["time"] - recs[0]["time"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="steps per trial (1200 ~ 60 s on 2 CPU cores)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--modes", type=int, nargs="+", default=[1, 2], help="workers per trial to measure")
    args = p.parse_args()
    raykd = str(Path(sys.executable).with_name("raykd"))
    work = Path(tempfile.mkdtemp(prefix="raykd-overhead-"))
    rows = []
    for workers in args.modes:
        name = f"overhead_w{workers}"
        study = {
            "name": name,
            "base": base_config(args.steps, workers),
            "search": {"method.threshold": {"uniform": [0.9, 0.97]}},
            "tune": {"num_samples": args.trials, "max_concurrent": 1, "scheduler": "none", "seed": 0},
        }
        (work / f"{name}.yaml").write_text(yaml.safe_dump(study))
        t_study = timed([raykd, "study", "run", f"{name}.yaml", "--storage", "studies_out"], work)
        trial_dirs = sorted((work / "studies_out" / name / "trials").iterdir(), key=lambda d: d.stat().st_mtime)
        t_train, loops_train = 0.0, 0.0
        for i, d in enumerate(trial_dirs):
            out = work / "train_out" / f"{name}_{i}"
            t_train += timed([raykd, "train", str(d / "config.yaml"), "--out", str(out)], work)
            loops_train += loop_seconds(out)
        loops_study = sum(loop_seconds(d) for d in trial_dirs)
        rows.append((workers, len(trial_dirs), t_study, t_train, loops_study, loops_train))
        print(f"{workers} worker(s): study {t_study:.1f} s, raykd train x{len(trial_dirs)} {t_train:.1f} s, "
              f"ratio {t_study / t_train:.3f}", flush=True)  # fmt: skip

    print(f"\n{args.trials} trials of {args.steps} steps, run one at a time (FixMatch, digits, small_cnn, CPU)")
    print(
        "| workers per trial | trial mode | study wall s | raykd train calls wall s | ratio study/train "
        "| training loop s in study | in train calls |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers, _n, t_study, t_train, ls, lt in rows:
        mode = "inline" if workers == 1 else "Train-in-Tune"
        print(f"| {workers} | {mode} | {t_study:.1f} | {t_train:.1f} | {t_study / t_train:.3f} | {ls:.1f} | {lt:.1f} |")


if __name__ == "__main__":
    main()
