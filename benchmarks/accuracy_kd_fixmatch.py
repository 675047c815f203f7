"""FixMatch vs KD-FixMatch on Fashion-MNIST at a small label count (same labels, budget and seeds).

For each seed, the outer network is a FixMatch run on the seed's labeled split; it *is* the FixMatch
baseline.  KD-FixMatch then trains a fresh inner network of the same architecture with the same
labels and the same number of steps, using the outer network's trusted pseudo-labels.  KD-FixMatch
therefore spends twice FixMatch's training steps (outer + inner): the **compute-matched** baseline is
FixMatch trained for the outer + inner steps together (``fixmatch (2x steps)``).  Writes a table (mean
± std over seeds) and the paired comparisons to stdout and, with ``--write``, into docs/results.md.

    python benchmarks/accuracy_kd_fixmatch.py                       # 4 labels/class, 5 seeds
    python benchmarks/accuracy_kd_fixmatch.py --labels 10 --steps 3000 --seeds 0 1 2 3 4 --write
"""

from __future__ import annotations

from common import arguments, begin, publish, record, run_config, teacher_result, train

SECTION = "## KD-FixMatch vs FixMatch (Fashion-MNIST)"
KEYS = ("test_acc", "best_test_acc", "trusted_size", "trusted_acc")


def main() -> None:
    args = arguments(__doc__.split("\n")[0], steps=500, width=8).parse_args()
    work, rows, started = begin(args, "kdfm")
    for seed in args.seeds:
        raw = run_config("kd_fixmatch", seed, args, teacher={"run": run_config("fixmatch", seed, args)})
        kdfm = train(raw, work / f"kd_fixmatch-{seed}", work)
        fm = teacher_result(raw, work)
        steps = args.steps
        args.steps = 2 * steps  # the outer + inner budget in one FixMatch run
        fm2 = train(run_config("fixmatch", seed, args), work / f"fixmatch-2x-{seed}", work)
        args.steps = steps
        record(rows, "fixmatch", fm, KEYS)
        record(rows, "fixmatch (2x steps)", fm2, KEYS)
        record(rows, "kd_fixmatch", kdfm, KEYS)
        print(f"seed {seed}: FixMatch {fm['test_acc']:.4f}, FixMatch 2x {fm2['test_acc']:.4f}, KD-FixMatch "
              f"{kdfm['test_acc']:.4f} (trusted "
              f"{kdfm['trusted_size']:.3f} of the pool, {kdfm['trusted_acc']:.3f} correct)", flush=True)  # fmt: skip

    description = (
        f"{args.labels} labels per class, small_cnn (width {args.width}), {args.steps} steps for each network "
        f"(batch 32 + 7·32), seeds {args.seeds}; FixMatch = the outer network; KD-FixMatch = a fresh inner "
        f"network with the outer network's trusted pseudo-labels; fixmatch (2x steps) = FixMatch for "
        f"{2 * args.steps} steps, KD-FixMatch's whole budget (outer + inner). Test accuracy of the EMA model, "
        "mean ± std over seeds."
    )
    columns = [("test_acc", "final test_acc"), ("best_test_acc", "best test_acc"),
               ("trusted_size", "trusted fraction"), ("trusted_acc", "trusted label acc")]  # fmt: skip
    claims = [("fixmatch", "kd_fixmatch"), ("fixmatch (2x steps)", "kd_fixmatch")]
    publish(SECTION, description, rows, columns, args, started, claims=claims)


if __name__ == "__main__":
    main()
