"""Supervised, KD, SRD and FixMatch students on Fashion-MNIST with classes 6-9 as unseen unlabeled data.

Open-set protocol (``data.open_set.unseen_classes: [6, 7, 8, 9]``): classes 0-5 are the task (labels,
test set, 6 outputs); the unlabeled pool holds every training image of classes 0-5 and 6-9, so 40 %
of it comes from classes no model is trained to recognise.  Every student is the same small_cnn with
the same labels (``--labels`` per class), steps, batch (32 labeled + ``--uratio`` x 32 unlabeled)
and seeds.  KD and SRD share one frozen teacher: a wider small_cnn trained supervised on all labeled
images of classes 0-5 (the usual distillation setting: a strong teacher, a student with few labels).
One more student adds SRD's optional logit-KD term (``alpha_kd``) to SRD.  Two closed-set controls
remove the unseen classes from the pool (``unseen_fraction: 0``), so the effect of the open-set
images on FixMatch and SRD is measured, not guessed.  Writes a table (mean ± std over seeds) to
stdout and, with ``--write``, into docs/results.md.

    python benchmarks/accuracy_srd.py --threads 1                    # 10 labels/class, 3 seeds, 1000 steps
    python benchmarks/accuracy_srd.py --steps 3000 --seeds 0 1 2 3 4 --write
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from common import arguments, publish, record, run_config, teacher_result, train

SECTION = "## SRD with open-set unlabeled data (Fashion-MNIST)"
UNSEEN = [6, 7, 8, 9]
KEYS = ("test_acc", "best_test_acc", "teacher_agree", "mask_rate_seen", "mask_rate_unseen")


def main() -> None:
    p = arguments(__doc__.split("\n")[0], labels=10, steps=1000, width=16)
    p.add_argument("--uratio", type=int, default=3, help="unlabeled batch = uratio x 32 (every method)")
    p.add_argument("--teacher-width", type=int, default=32, help="small_cnn width of the teacher")
    p.add_argument("--no-controls", action="store_true", help="skip the closed-set FixMatch and SRD controls")
    p.add_argument("--srd-alpha-kd", type=float, default=0.9, help="alpha_kd of the SRD + logit KD row")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="raykd-acc-srd-"))
    open_set = {"unseen_classes": UNSEEN}
    closed = {**open_set, "unseen_fraction": 0.0}
    teacher = run_config("supervised", 0, args, data={"labels_per_class": None, "open_set": open_set},
                         model={"width": args.teacher_width})  # fmt: skip
    srd_kd = {"name": "srd", "alpha_kd": args.srd_alpha_kd}
    runs = [  # (row, run folder, method, open_set, teacher)
        ("supervised", "supervised", "supervised", open_set, None),
        ("kd (open-set pool)", "kd", "kd", open_set, teacher),
        ("srd (open-set pool)", "srd", "srd", open_set, teacher),
        (f"srd + logit KD α_kd {args.srd_alpha_kd:g} (open-set pool)", "srd_kd", srd_kd, open_set, teacher),
        ("fixmatch (open-set pool)", "fixmatch", "fixmatch", open_set, None),
    ]
    if not args.no_controls:
        runs += [
            ("srd (closed-set pool)", "srd-closed", "srd", closed, teacher),
            ("fixmatch (closed-set pool)", "fixmatch-closed", "fixmatch", closed, None),
        ]
    rows: dict[str, dict[str, list[float]]] = {}
    started = time.time()
    for seed in args.seeds:
        for label, folder, method, data, tcfg in runs:
            raw = run_config(method, seed, args, data={"open_set": data}, train={"uratio": args.uratio})
            if tcfg is not None:
                raw["teacher"] = {"run": tcfg}
            result = train(raw, work / f"{folder}-{seed}", work)
            result = {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}
            record(rows, label, result, KEYS)
            print(f"seed {seed}: {label} {result['test_acc']:.4f} ({time.time() - started:.0f} s)", flush=True)
    raw = run_config("kd", 0, args, data={"open_set": open_set}, teacher={"run": teacher})
    rows = {"teacher (supervised, all labels of classes 0-5)": {}, **rows}
    record(rows, "teacher (supervised, all labels of classes 0-5)", teacher_result(raw, work), ("test_acc",))

    description = (
        f"Fashion-MNIST, classes 6-9 unseen: 6-way task, {args.labels} labels per class, unlabeled pool = all "
        f"training images of classes 0-9 (40 % unseen; closed-set controls: classes 0-5 only). Students: small_cnn "
        f"width {args.width}, {args.steps} steps, batch 32 + {args.uratio}·32 unlabeled, seeds {args.seeds}. "
        f"Teacher (KD, SRD): small_cnn width {args.teacher_width}, supervised on all labeled images of classes 0-5, "
        f"{args.steps} steps, one for all seeds. Method knobs at their defaults (KD α 0.9, T 4; SRD β 1, w_feat 1, "
        "MSE, α_kd 0 — the row 'srd + logit KD' adds Hinton KD on all images; FixMatch τ 0.95). Test accuracy "
        "on classes 0-5 of the EMA model, mean ± std over seeds; mask rates are FixMatch's (seen-class vs "
        "unseen-class unlabeled images)."
    )
    columns = [("test_acc", "final test_acc"), ("best_test_acc", "best test_acc"),
               ("teacher_agree", "agrees with teacher"), ("mask_rate_seen", "mask rate, seen"),
               ("mask_rate_unseen", "mask rate, unseen")]  # fmt: skip
    publish(SECTION, description, rows, columns, args, started)


if __name__ == "__main__":
    main()
