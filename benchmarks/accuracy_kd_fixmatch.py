"""FixMatch vs KD-FixMatch on Fashion-MNIST at a small label count (same labels, budget and seeds).

For each seed, the outer network is a FixMatch run on the seed's labeled split; it *is* the FixMatch
baseline.  KD-FixMatch then trains a fresh inner network of the same architecture with the same
labels and the same number of steps, using the outer network's trusted pseudo-labels.  Writes a
table (mean ± std over seeds) to stdout and, with ``--write``, into docs/results.md.

    python benchmarks/accuracy_kd_fixmatch.py                       # 4 labels/class, 3 seeds, 1500 steps
    python benchmarks/accuracy_kd_fixmatch.py --labels 10 --steps 3000 --seeds 0 1 2 3 4 --write
"""

from __future__ import annotations

from common import arguments, begin, publish, record, run_config, teacher_result, train

SECTION = "## KD-FixMatch vs FixMatch (Fashion-MNIST)"
KEYS = ("test_acc", "best_test_acc", "trusted_size", "trusted_acc")


def main() -> None:
    args = arguments(__doc__.split("\n")[0]).parse_args()
    work, rows, started = begin(args, "kdfm")
    for seed in args.seeds:
        raw = run_config("kd_fixmatch", seed, args, teacher={"run": run_config("fixmatch", seed, args)})
        kdfm = train(raw, work / f"kd_fixmatch-{seed}", work)
        fm = teacher_result(raw, work)
        record(rows, "fixmatch", fm, KEYS)
        record(rows, "kd_fixmatch", kdfm, KEYS)
        print(f"seed {seed}: FixMatch {fm['test_acc']:.4f}, KD-FixMatch {kdfm['test_acc']:.4f} (trusted "
              f"{kdfm['trusted_size']:.3f} of the pool, {kdfm['trusted_acc']:.3f} correct)", flush=True)  # fmt: skip

    description = (
        f"{args.labels} labels per class, small_cnn (width {args.width}), {args.steps} steps for each network "
        f"(batch 32 + 7·32), seeds {args.seeds}; FixMatch = the outer network; KD-FixMatch = a fresh inner "
        "network with the outer network's trusted pseudo-labels. Test accuracy of the EMA model, mean ± std "
        "over seeds."
    )
    columns = [("test_acc", "final test_acc"), ("best_test_acc", "best test_acc"),
               ("trusted_size", "trusted fraction"), ("trusted_acc", "trusted label acc")]  # fmt: skip
    publish(SECTION, description, rows, columns, args, started)


if __name__ == "__main__":
    main()
