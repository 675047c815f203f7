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

SRD's own protocol (``--protocol own``, its own section): every training image of classes 0-5 is
labelled, the unlabeled pool holds only classes 6-9 (``unseen_fraction: 1``), one unlabeled image per
labelled one in every batch (``uratio 1``), and the methods run with the official scripts' weights:
SRD without its logit-KD term (``-a 0 -b 1``: α_kd 0, β 1), KD with ``-r 0.1 -a 0.9`` (CE 0.1, KD
0.9), against the student alone.

    python benchmarks/accuracy_srd.py --threads 1 --no-controls --write       # few labels, 5 seeds
    python benchmarks/accuracy_srd.py --threads 1 --protocol own --write       # SRD's own protocol
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from common import arguments, publish, record, run_config, teacher_result, train

SECTION = "## SRD with open-set unlabeled data (Fashion-MNIST)"
OWN_SECTION = "## SRD in its own protocol (Fashion-MNIST)"
UNSEEN = [6, 7, 8, 9]
KEYS = ("test_acc", "best_test_acc", "teacher_agree", "mask_rate_seen", "mask_rate_unseen")


def main() -> None:
    p = arguments(__doc__.split("\n")[0], labels=10, steps=600, width=8)
    p.add_argument("--protocol", choices=["few_labels", "own"], default="few_labels",
                   help="few_labels: the open-set SSL table; own: SRD's own fully labelled protocol")
    p.add_argument("--uratio", type=int, default=3, help="unlabeled batch = uratio x 32 (every method)")
    p.add_argument("--teacher-width", type=int, default=16, help="small_cnn width of the teacher")
    p.add_argument("--no-controls", action="store_true", help="skip the closed-set FixMatch and SRD controls")
    p.add_argument("--srd-alpha-kd", type=float, default=0.9, help="alpha_kd of the SRD + logit KD row")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.protocol == "own":
        return own_protocol(args)
    work = Path(tempfile.mkdtemp(prefix="raykd-acc-srd-"))
    open_set = {"unseen_classes": UNSEEN}
    closed = {**open_set, "unseen_fraction": 0.0}
    teacher = run_config("supervised", 0, args, data={"labels_per_class": None, "open_set": open_set},
                         model={"width": args.teacher_width})  # fmt: skip
    srd_kd = {"name": "srd", "alpha_kd": args.srd_alpha_kd}
    srd_kd_label = f"srd + logit KD α_kd {args.srd_alpha_kd:g} (open-set pool)"
    runs = [  # (row, run folder, method, open_set, teacher)
        ("supervised", "supervised", "supervised", open_set, None),
        ("kd (open-set pool)", "kd", "kd", open_set, teacher),
        ("srd (open-set pool)", "srd", "srd", open_set, teacher),
        (srd_kd_label, "srd_kd", srd_kd, open_set, teacher),
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
    claims = [("kd (open-set pool)", "srd (open-set pool)"), ("supervised", "srd (open-set pool)"),
              ("fixmatch (open-set pool)", "kd (open-set pool)"), ("kd (open-set pool)", srd_kd_label)]
    publish(SECTION, description, rows, columns, args, started, claims=claims)


def own_protocol(args) -> None:
    """SRD's own setting: all labels of the task classes, an unlabeled pool of unseen classes only."""
    work = Path(tempfile.mkdtemp(prefix="raykd-acc-srd-own-"))
    data = {"labels_per_class": None, "open_set": {"unseen_classes": UNSEEN, "unseen_fraction": 1.0}}
    teacher = run_config("supervised", 0, args, data=data, model={"width": args.teacher_width})
    arms = [  # (row, method section, teacher)
        ("student alone (supervised)", {"name": "supervised"}, None),
        ("kd (CE 0.1, KD 0.9)", {"name": "kd", "alpha": 0.9}, teacher),
        ("srd (α_kd 0, β 1)", {"name": "srd", "alpha_kd": 0.0, "beta": 1.0}, teacher),
    ]
    rows: dict[str, dict[str, list[float]]] = {}
    started = time.time()
    for seed in args.seeds:
        for label, method, tcfg in arms:
            raw = run_config(method, seed, args, data=data, train={"uratio": 1})
            if tcfg is not None:
                raw["teacher"] = {"run": tcfg}
            result = train(raw, work / f"{method['name']}-{seed}", work)
            record(rows, label, result, ("test_acc", "best_test_acc", "teacher_agree"))
            print(f"seed {seed}: {label} {result['test_acc']:.4f} ({time.time() - started:.0f} s)", flush=True)
    raw = run_config("kd", 0, args, data=data, teacher={"run": teacher})
    rows = {"teacher (supervised, all labels of classes 0-5)": {}, **rows}
    record(rows, "teacher (supervised, all labels of classes 0-5)", teacher_result(raw, work), ("test_acc",))
    description = (
        "SRD's own protocol on Fashion-MNIST: a 6-way task (classes 0-5) with **every** training image labelled "
        "(36,000), an unlabeled pool of only the unseen classes 6-9 (24,000 images), each batch 32 labelled + "
        f"32 unlabeled images. Students: small_cnn width {args.width}, {args.steps} steps, seeds {args.seeds}; "
        f"teacher: small_cnn width {args.teacher_width}, supervised on the same labels, {args.steps} steps, one "
        "for all seeds. Weights as in the official scripts: SRD `-a 0 -b 1` (no logit KD, β 1, γ_CE 1, MSE), "
        "KD `-r 0.1 -a 0.9` (T 4). Test accuracy on classes 0-5 of the EMA model, mean ± std over seeds."
    )
    columns = [("test_acc", "final test_acc"), ("best_test_acc", "best test_acc"),
               ("teacher_agree", "agrees with teacher")]  # fmt: skip
    alone, kd, srd = (label for label, _, _ in arms)
    claims = [(alone, kd), (alone, srd), (kd, srd)]
    publish(OWN_SECTION, description, rows, columns, args, started, claims=claims)


if __name__ == "__main__":
    main()
