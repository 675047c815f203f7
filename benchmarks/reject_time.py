"""Time from `raykd ...` to the one-line refusal of a typo (target < 1 s), now and at an older commit.

Each case writes a config with one misspelt key and runs the real command in a fresh interpreter
(`python -m raykd.cli ...`, so the figure includes Python's start-up and every import the command
makes), `--repeats` times; the table gives the median wall time.  With `--before REV` the same cases
run, in the same session, against a temporary `git worktree` of REV (e.g. the commit before the
registry stopped importing plugin modules to validate), so the ratio is measured in one run.

    python benchmarks/reject_time.py                      # this checkout only
    python benchmarks/reject_time.py --before 9fe7da4     # beside the commit before the change
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name -> (command, file text)
    "train: method key": (["train"], "method: {name: fixmatch, treshold: 0.9}\n"),
    "train: model argument": (["train"], "model: {name: wrn_28_2, drop_rat: 0.1}\nmethod: {name: fixmatch}\n"),
    "study run: method key": (["study", "run"], "name: s\nbase: {method: {name: layermatch, avg_mod: x}}\n"),
    "ablate: method key": (["ablate"], "name: a\nbase: {method: {name: kd, alpah: 1}}\ngrid: {train.lr: [0.1]}\n"),
}


def time_case(source: Path, argv: list[str], repeats: int, cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    times, last = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "raykd.cli", *argv], env=env, capture_output=True, text=True,
                              cwd=cwd)  # fmt: skip  (not the checkout: `-m` puts the cwd first on sys.path)
        times.append(time.perf_counter() - t0)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        if proc.returncode != 2:
            raise SystemExit(f"{argv}: expected exit 2, got {proc.returncode}: {proc.stderr[-500:]}")
    return statistics.median(times), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a git revision to time beside this checkout")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sources = {"now": ROOT}
        if args.before:
            old = tmp_path / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before],
                           check=True, capture_output=True)  # fmt: skip
            sources[f"at {args.before}"] = old
        try:
            rows = []
            for name, (command, text) in CASES.items():
                path = tmp_path / f"{len(rows)}.yaml"
                path.write_text(text)
                argv = [*command, str(path)]
                cells = {label: time_case(src, argv, args.repeats, tmp_path) for label, src in sources.items()}
                rows.append((name, cells))
                print(f"{name}: " + ", ".join(f"{k} {v[0]:.2f} s" for k, v in cells.items()), flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    labels = list(sources)
    header = ["case", *(f"{k} (s)" for k in labels)] + (["ratio"] if len(labels) == 2 else [])
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, cells in rows:
        values = [cells[k][0] for k in labels]
        ratio = [f"{values[1] / values[0]:.1f}x faster"] if len(values) == 2 else []
        print("| " + " | ".join([name, *(f"{v:.2f}" for v in values), *ratio]) + " |")
    print(f"\nmedian of {args.repeats} runs each; message of the last run:")
    for name, cells in rows:
        print(f"  {name}: {cells['now'][1]}")


if __name__ == "__main__":
    main()
