"""FixMatch vs Grad-ReLU only vs Avg-Clustering only vs LayerMatch on Fashion-MNIST (same labels, budget, seeds).

The four runs of a seed share the labeled split, the initialisation, the batches and the number of
steps; they differ only in the pseudo-label loss:

* ``fixmatch``: FixMatch (τ = 0.95).
* ``grad_relu``: LayerMatch with ``avg_mode: none`` — FixMatch's targets and mask, the pseudo-label
  gradient blocked at the linear classifier (``cls_grad_scale: 0``).
* ``avg_clustering``: LayerMatch with ``cls_grad_scale: 1`` — the per-sample EMA bank's targets and
  consistency mask (τ_a = 0.95, m_a = 0.9), the classifier trained by pseudo-labels as in FixMatch.
* ``layermatch``: both (the method's defaults).

Writes a table (mean ± std over seeds) to stdout and, with ``--write``, into docs/results.md.

    python benchmarks/accuracy_layermatch.py --threads 1                  # 4 labels/class, 3 seeds
    python benchmarks/accuracy_layermatch.py --labels 10 --steps 2000 --seeds 0 1 2 3 4 --write
"""

from __future__ import annotations

import time

from common import arguments, begin, record, run_config, table, train, write_section

SECTION = "## LayerMatch vs FixMatch (Fashion-MNIST)"
KEYS = ("test_acc", "best_test_acc", "mask_rate", "pseudo_acc")
VARIANTS = {
    "fixmatch": {"name": "fixmatch"},
    "grad_relu": {"name": "layermatch", "avg_mode": "none", "cls_grad_scale": 0.0},
    "avg_clustering": {"name": "layermatch", "avg_mode": "sample_ema", "cls_grad_scale": 1.0},
    "layermatch": {"name": "layermatch"},
}


def main() -> None:
    p = arguments(__doc__.split("\n")[0], steps=600, width=16)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    work, rows, started = begin(args, "layermatch")
    for seed in args.seeds:
        accs = []
        for name in args.variants:
            result = train(run_config(VARIANTS[name], seed, args), work / f"{name}-{seed}", work)
            record(rows, name, result, KEYS)
            accs.append(f"{name} {result['test_acc']:.4f}")
        print(f"seed {seed}: " + ", ".join(accs) + f" ({time.time() - started:.0f} s)", flush=True)

    lines = [
        SECTION,
        "",
        f"{args.labels} labels per class, small_cnn (width {args.width}), {args.steps} steps for every run "
        f"(batch 32 + 7·32), seeds {args.seeds}. grad_relu = LayerMatch with Avg-Clustering off; "
        "avg_clustering = LayerMatch with the classifier's pseudo-label gradient kept (cls_grad_scale 1); "
        "layermatch = both (defaults: per-sample EMA bank, m_a 0.9, τ_a 0.95, consistency mask, "
        "cls_grad_scale 0). Test accuracy of the EMA model, mean ± std over seeds; mask rate and "
        "pseudo-label accuracy of the last logging window. Command: `python benchmarks/accuracy_layermatch.py "
        f"--labels {args.labels} --steps {args.steps} --width {args.width} --threads {args.threads} --seeds "
        f"{' '.join(map(str, args.seeds))} --write` ({time.time() - started:.0f} s on this machine).",
        "",
        *table(rows, [("test_acc", "final test_acc"), ("best_test_acc", "best test_acc"),
                      ("mask_rate", "mask rate"), ("pseudo_acc", "pseudo-label acc")]),
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
