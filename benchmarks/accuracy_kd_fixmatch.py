"""FixMatch vs KD-FixMatch on Fashion-MNIST at a small label count (same labels, budget and seeds).

For each seed, the outer network is a FixMatch run on the seed's labeled split; it *is* the FixMatch
baseline.  KD-FixMatch then trains a fresh inner network of the same architecture with the same
labels and the same number of steps, using the outer network's trusted pseudo-labels.  Runs are
in-process (no Ray) to spend the CPU on training.  Data: Debian's `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist).  Writes a table (mean ± std over seeds) to stdout and, with
``--write``, into docs/results.md.

    python benchmarks/accuracy_kd_fixmatch.py                       # 4 labels/class, 3 seeds, 1500 steps
    python benchmarks/accuracy_kd_fixmatch.py --labels 10 --steps 3000 --seeds 0 1 2 3 4 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from raykd.config import parse_run_config
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop
from raykd.train.teacher import ensure_teacher

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
SECTION = "## KD-FixMatch vs FixMatch (Fashion-MNIST)"


def run_config(method: str, seed: int, args, teacher: dict | None = None) -> dict:
    raw = {
        "data": {"name": "fashion_mnist", "labels_per_class": args.labels, "val_per_class": 0, "seed": seed},
        "model": {"name": "small_cnn", "width": args.width},
        "method": {"name": method},
        "train": {"steps": args.steps, "batch_size": 32, "uratio": 7, "eval_every": args.steps // 5, "seed": seed,
                  "eval_batch_size": 1024},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
    }  # fmt: skip
    if teacher is not None:
        raw["teacher"] = {"run": teacher}
    return raw


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=4, help="labels per class")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the table into docs/results.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raykd-acc-kdfm-"))
    rows: dict[str, dict[str, list[float]]] = {"fixmatch": {}, "kd_fixmatch": {}}
    started = time.time()
    for seed in args.seeds:
        outer = run_config("fixmatch", seed, args)
        cfg = parse_run_config(run_config("kd_fixmatch", seed, args, teacher=outer))
        teacher_dir = ensure_teacher(cfg, work, lambda tcfg, d: train_loop(tcfg, LocalSession(d), d))
        results = {"fixmatch": json.loads((teacher_dir / "result.json").read_text())}
        run_dir = work / f"kd_fixmatch-{seed}"
        results["kd_fixmatch"] = train_loop(cfg, LocalSession(run_dir), run_dir, teacher_dir=teacher_dir)
        for method, m in results.items():
            for key in ("test_acc", "best_test_acc", "trusted_size", "trusted_acc"):
                if key in m:
                    rows[method].setdefault(key, []).append(float(m[key]))
        print(f"seed {seed}: FixMatch {results['fixmatch']['test_acc']:.4f}, KD-FixMatch "
              f"{results['kd_fixmatch']['test_acc']:.4f} (trusted {results['kd_fixmatch']['trusted_size']:.3f} of the "
              f"pool, {results['kd_fixmatch']['trusted_acc']:.3f} correct)", flush=True)  # fmt: skip

    table = [
        f"{SECTION}",
        "",
        f"{args.labels} labels per class, small_cnn (width {args.width}), {args.steps} steps for each network "
        f"(batch 32 + 7·32), seeds {args.seeds}; FixMatch = the outer network; KD-FixMatch = a fresh inner "
        f"network with the outer network's trusted pseudo-labels. Test accuracy of the EMA model, mean ± std "
        f"over seeds. Command: `python benchmarks/accuracy_kd_fixmatch.py --labels {args.labels} --steps "
        f"{args.steps} --seeds {' '.join(map(str, args.seeds))} --write` ({time.time() - started:.0f} s on this "
        "machine).",
        "",
        "| method | final test_acc | best test_acc | trusted fraction | trusted label acc |",
        "|---|---|---|---|---|",
    ]
    for method, vals in rows.items():
        cells = [mean_std(vals[k]) if k in vals else "–" for k in ("test_acc", "best_test_acc", "trusted_size",
                                                                    "trusted_acc")]  # fmt: skip
        table.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(table) + "\n"
    print("\n" + text)
    if args.write:
        old = RESULTS.read_text() if RESULTS.exists() else "# Accuracy results\n\n"
        head, _, rest = old.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        RESULTS.write_text(head.rstrip() + "\n\n" + text + ("\n" + tail if tail else ""))
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
