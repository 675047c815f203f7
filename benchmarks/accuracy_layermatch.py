"""LayerMatch vs FixMatch on Fashion-MNIST at two budgets, with Avg-Clustering's default chosen on validation data.

Every run of a seed shares the labeled split, the validation split, the initialisation, the batches
and the budget; the runs differ only in the pseudo-label loss:

* ``fixmatch``: FixMatch (τ = 0.95).
* ``grad_relu``: LayerMatch with ``avg_mode: none`` — FixMatch's targets and mask, the pseudo-label
  gradient blocked at the linear classifier (``cls_grad_scale: 0``).
* ``layermatch [mode]``: Grad-ReLU plus one reading of Avg-Clustering: ``sample_ema`` (a threshold on
  the per-sample running average; shrinks FixMatch's mask), ``feature_center`` (class centres of the
  features and a pull term) or ``soft_avg`` (the averaged prediction as a soft target under
  FixMatch's own mask).
* ``avg_clustering [mode]``: that reading with the classifier's pseudo-label gradient kept
  (``cls_grad_scale: 1``), i.e. Avg-Clustering alone.

Phase 1, at the small budget: FixMatch, Grad-ReLU and LayerMatch with every reading; the reading
with the best mean **validation** accuracy (never test) becomes the one the large budget uses.
Phase 2, at the large budget (at least 4× the small one): FixMatch, LayerMatch and Avg-Clustering
alone with that reading.  Writes the tables, the paired comparisons and the choice to stdout and,
with ``--write``, into docs/results.md.

    python benchmarks/accuracy_layermatch.py --threads 1 --write        # 400 and 1600 steps, 5 seeds
"""

from __future__ import annotations

import statistics
import time

from common import arguments, begin, publish, record, run_config, train

SECTION = "## LayerMatch vs FixMatch (Fashion-MNIST)"
KEYS = ("test_acc", "val_acc", "best_test_acc", "mask_rate", "pseudo_acc")
MODES = ("sample_ema", "feature_center", "soft_avg")


def variant(name: str, mode: str | None = None) -> dict:
    if name == "fixmatch":
        return {"name": "fixmatch"}
    if name == "grad_relu":
        return {"name": "layermatch", "avg_mode": "none", "cls_grad_scale": 0.0}
    if name == "layermatch":
        return {"name": "layermatch", "avg_mode": mode, "cls_grad_scale": 0.0}
    return {"name": "layermatch", "avg_mode": mode, "cls_grad_scale": 1.0}  # avg_clustering alone


def main() -> None:
    p = arguments(__doc__.split("\n")[0], steps=400, width=8)
    p.add_argument("--budgets", type=int, nargs=2, default=[400, 1600], help="small and large step budgets")
    p.add_argument("--val", type=int, default=20, help="validation images per class (selection only)")
    args = p.parse_args()
    small, large = args.budgets
    if large < 4 * small:
        p.error("the large budget must be at least 4x the small one")
    work, rows, started = begin(args, "layermatch")

    def run(label: str, method: dict, steps: int, seed: int) -> None:
        args.steps = steps
        raw = run_config(method, seed, args, data={"val_per_class": args.val})
        t0 = time.time()
        result = train(raw, work / f"{label.replace(' ', '_').replace('[', '').replace(']', '')}-{seed}", work)
        record(rows, label, result, KEYS)
        print(f"seed {seed}: {label} test {result['test_acc']:.4f} val {result['val_acc']:.4f} "
              f"({time.time() - t0:.0f} s, {time.time() - started:.0f} s in all)", flush=True)  # fmt: skip

    for seed in args.seeds:  # phase 1: the small budget, every reading
        run(f"fixmatch @{small}", variant("fixmatch"), small, seed)
        run(f"grad_relu @{small}", variant("grad_relu"), small, seed)
        for mode in MODES:
            run(f"layermatch [{mode}] @{small}", variant("layermatch", mode), small, seed)
    val = {m: statistics.mean(rows[f"layermatch [{m}] @{small}"]["val_acc"]) for m in MODES}
    chosen = max(MODES, key=lambda m: val[m])
    print(f"validation accuracy by reading at {small} steps: {val}; chosen: {chosen}", flush=True)
    for seed in args.seeds:
        run(f"avg_clustering [{chosen}] @{small}", variant("avg_clustering", chosen), small, seed)
    for seed in args.seeds:  # phase 2: the large budget, the chosen reading
        run(f"fixmatch @{large}", variant("fixmatch"), large, seed)
        run(f"layermatch [{chosen}] @{large}", variant("layermatch", chosen), large, seed)
        run(f"avg_clustering [{chosen}] @{large}", variant("avg_clustering", chosen), large, seed)

    claims = [(f"fixmatch @{small}", f"grad_relu @{small}")]
    claims += [(f"fixmatch @{small}", f"layermatch [{m}] @{small}") for m in MODES]
    claims += [(f"fixmatch @{b}", f"{arm} [{chosen}] @{b}") for b in (small, large)
               for arm in ("layermatch", "avg_clustering")]  # fmt: skip
    claims = list(dict.fromkeys(claims))  # the chosen reading's small-budget claim is listed once
    choice = ("Choice of Avg-Clustering's reading, by mean validation accuracy at "
              f"{small} steps (test accuracy is not looked at): "
              + ", ".join(f"{m} {val[m]:.4f}" for m in MODES) + f" → **{chosen}**.")  # fmt: skip
    description = (
        f"{args.labels} labels per class (+ {args.val} per class held out for validation), small_cnn (width "
        f"{args.width}), batch 32 + 7·32, seeds {args.seeds}; budgets {small} and {large} steps (each pool image "
        f"is seen about {small * 224 / 60000:.1f} and {large * 224 / 60000:.1f} times). grad_relu = LayerMatch "
        "with Avg-Clustering off; layermatch [mode] = Grad-ReLU (cls_grad_scale 0) + that reading of "
        "Avg-Clustering; avg_clustering [mode] = the reading with the classifier's pseudo-label gradient kept "
        "(cls_grad_scale 1). Test accuracy of the EMA model, mean ± std over seeds; mask rate and pseudo-label "
        "accuracy of the last logging window."
    )
    columns = [("test_acc", "final test_acc"), ("val_acc", "val_acc"), ("best_test_acc", "best test_acc"),
               ("mask_rate", "mask rate"), ("pseudo_acc", "pseudo-label acc")]  # fmt: skip
    publish(SECTION, description, rows, columns, args, started, claims=claims, extra=choice)


if __name__ == "__main__":
    main()
