"""Student alone vs KD vs self-distillation vs TSKD on Fashion-MNIST (same labels, model, budget, seeds).

For each seed, a wider FixMatch network trained on the seed's labeled split is the frozen teacher.
The student (small_cnn, ``--width``) then trains four ways with the same labels and steps:
supervised on the labels alone; vanilla KD from the teacher; ``tskd_sd`` (multi-exit, self-
distillation from its deepest exit only, no teacher); and ``tskd`` (multi-exit, teacher KD + self-
distillation).  Reports each exit's and each vote's test accuracy (the weighted vote's weights are
the exits' accuracies on a held-out validation split of ``--val`` per class).  Writes a table (mean ±
std over seeds) to stdout and, with ``--write``, into docs/results.md.

    python benchmarks/accuracy_tskd.py                            # 10 labels/class, 3 seeds
    python benchmarks/accuracy_tskd.py --steps 1200 --seeds 0 1 2 3 4 --threads 1 --write
"""

from __future__ import annotations

import time

from common import arguments, begin, publish, record, run_config, teacher_result, train

SECTION = "## TSKD (Fashion-MNIST)"
EXITS = ("test_exit1_acc", "test_exit2_acc", "test_exit3_acc")
VOTES = ("test_vote_soft_acc", "test_vote_hard_acc", "test_vote_weighted_acc", "test_vote_mean_logits_acc")
#: BYOT's weighting (its authors' code): shallow exits' CE 0.7, self-distillation KL without T²
BYOT = {"w_ce_shallow": 0.7, "sd_t_squared": False}
KEYS = ("test_acc", *EXITS, *VOTES)


def main() -> None:
    p = arguments(__doc__.split("\n")[0], labels=10, steps=500, width=8)
    p.add_argument("--teacher-width", type=int, default=16, help="small_cnn width of the FixMatch teacher")
    p.add_argument("--uratio", type=int, default=3, help="unlabeled batch = uratio x 32")
    p.add_argument("--val", type=int, default=5, help="validation images per class (weighted vote only)")
    args = p.parse_args()
    work, rows, started = begin(args, "tskd")
    data = {"val_per_class": args.val}
    tr = {"uratio": args.uratio}
    for seed in args.seeds:
        teacher_run = run_config("fixmatch", seed, args, data=data, train=tr, model={"width": args.teacher_width})
        teacher = {"run": teacher_run}
        runs = {
            "student alone (supervised)": run_config("supervised", seed, args, data=data, train=tr),
            "KD": run_config("kd", seed, args, data=data, train=tr, teacher=teacher),
            "self-distillation only (tskd_sd)": run_config("tskd_sd", seed, args, data=data, train=tr),
            "TSKD": run_config("tskd", seed, args, data=data, train=tr, teacher=teacher),
            "TSKD, BYOT's weights": run_config({"name": "tskd", **BYOT}, seed, args, data=data, train=tr,
                                               teacher=teacher),
        }
        line = []
        for label, raw in runs.items():
            t0 = time.time()
            folder = "".join(ch if ch.isalnum() else "_" for ch in label)
            result = train(raw, work / f"{folder}-{seed}", work)
            if "test_exit3_acc" not in result:  # a single-exit network's output is its deepest exit
                result = {**result, "test_exit3_acc": result["test_acc"]}
            record(rows, label, result, KEYS)
            line.append(f"{label} {result['test_acc']:.4f} ({time.time() - t0:.0f} s)")
        record(rows, f"teacher (FixMatch, width {args.teacher_width})", teacher_result(runs["KD"], work), ("test_acc",))
        print(f"seed {seed}: " + "; ".join(line), flush=True)
    rows = {k: rows[k] for k in sorted(rows, key=lambda k: not k.startswith("teacher"))}

    description = (
        f"{args.labels} labels per class (+ {args.val} per class held out for the weighted vote), small_cnn "
        f"student (width {args.width}), {args.steps} steps for every network (batch 32 + {args.uratio}·32 "
        f"unlabeled), seeds {args.seeds}; the frozen teacher is a FixMatch small_cnn of width "
        f"{args.teacher_width} trained on the same labels. Multi-exit students have an exit after each "
        "of the 3 stages (exit 3 = the network's own head, the same architecture as the single-exit "
        "students); their `final test_acc` is the soft vote. 'TSKD, BYOT's weights' sets the shallow exits' CE "
        "weight to 0.7 and drops the T² factor of the self-distillation KL (w_ce_shallow 0.7, sd_t_squared "
        "false). For single-exit students the exit-3 column "
        "repeats their test accuracy. Test accuracy of the EMA model, mean ± std over seeds."
    )
    columns = [("test_acc", "final test_acc"), ("test_exit1_acc", "exit 1"), ("test_exit2_acc", "exit 2"),
               ("test_exit3_acc", "exit 3 (deepest)"), ("test_vote_soft_acc", "soft vote"),
               ("test_vote_hard_acc", "hard vote"), ("test_vote_weighted_acc", "weighted vote"),
               ("test_vote_mean_logits_acc", "mean-logits vote")]  # fmt: skip
    claims = [("KD", "TSKD"), ("student alone (supervised)", "self-distillation only (tskd_sd)"),
              ("TSKD", "TSKD, BYOT's weights")]  # fmt: skip
    for label in ("TSKD", "TSKD, BYOT's weights"):  # does the vote beat the deepest exit alone?
        rows[f"{label}: exit 3 alone"] = {"test_acc": rows[label]["test_exit3_acc"]}
        claims.append((f"{label}: exit 3 alone", label))
    publish(SECTION, description, rows, columns, args, started, claims=claims)


if __name__ == "__main__":
    main()
