"""Shared scaffolding of the accuracy benchmarks (``benchmarks/accuracy_*.py``).

Every accuracy benchmark trains in-process (no Ray: the CPU goes to training) on Fashion-MNIST from
Debian's ``dataset-fashion-mnist`` package, compares methods with the same labels, model, budget and
seeds, and writes one section of docs/results.md (mean ± std over seeds) with ``--write``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from raykd.config import RunConfig, parse_run_config
from raykd.report import format_paired, paired_comparison
from raykd.train.context import LocalSession
from raykd.train.loop import train_loop
from raykd.train.teacher import ensure_teacher

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def arguments(description: str, *, labels: int = 4, steps: int = 1500, width: int = 32) -> argparse.ArgumentParser:
    """The options every accuracy benchmark takes (a script may add its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--labels", type=int, default=labels, help="labels per class")
    p.add_argument("--steps", type=int, default=steps, help="training steps of every network")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="at least 5 for a verdict")
    p.add_argument("--width", type=int, default=width, help="small_cnn width")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--write", action="store_true", help="write the table into docs/results.md")
    return p


def begin(args: argparse.Namespace, name: str) -> tuple[Path, dict[str, dict[str, list[float]]], float]:
    """Set torch's threads; return a fresh scratch folder, the empty result rows and the start time."""
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    return Path(tempfile.mkdtemp(prefix=f"raykd-acc-{name}-")), {}, time.time()


def run_config(method: str | dict[str, Any], seed: int, args: argparse.Namespace, **sections: dict[str, Any]) -> dict:
    """A raw Fashion-MNIST run config for ``method`` (a name or a ``method`` section).

    Keyword arguments merge into sections (``model={"width": 8}``, ``teacher={"run": ...}``).
    """
    raw: dict[str, Any] = {
        "data": {"name": "fashion_mnist", "labels_per_class": args.labels, "val_per_class": 0, "seed": seed},
        "model": {"name": "small_cnn", "width": args.width},
        "method": {"name": method} if isinstance(method, str) else dict(method),
        "train": {"steps": args.steps, "batch_size": 32, "uratio": 7, "eval_every": max(1, args.steps // 5),
                  "seed": seed, "eval_batch_size": 1024},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
    }  # fmt: skip
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def train(raw: dict[str, Any] | RunConfig, run_dir: Path, cache_root: Path) -> dict[str, Any]:
    """Train one run in-process (its teacher first, cached under ``cache_root``); its result record."""
    cfg = raw if isinstance(raw, RunConfig) else parse_run_config(raw)
    teacher_dir = None
    if cfg.teacher is not None:
        teacher_dir = ensure_teacher(cfg, cache_root, lambda tcfg, d: train_loop(tcfg, LocalSession(d), d))
    return train_loop(cfg, LocalSession(run_dir), run_dir, teacher_dir=teacher_dir)


def teacher_result(raw: dict[str, Any], cache_root: Path) -> dict[str, Any]:
    """The result record of ``raw``'s teacher (trained and cached by :func:`train`)."""
    cfg = parse_run_config(raw)
    d = ensure_teacher(cfg, cache_root, lambda tcfg, d: train_loop(tcfg, LocalSession(d), d))
    return json.loads((d / "result.json").read_text())


def mean_std(xs: list[float]) -> str:
    """``mean ± std`` of the finite values (``n=...`` when some were not finite, e.g. an empty mask)."""
    finite = [x for x in xs if math.isfinite(x)]
    if not finite:
        return "–"
    text = f"{statistics.mean(finite):.4f} ± {statistics.stdev(finite) if len(finite) > 1 else 0.0:.4f}"
    return text if len(finite) == len(xs) else f"{text} (n={len(finite)})"


def table(rows: dict[str, dict[str, list[float]]], columns: Iterable[tuple[str, str]]) -> list[str]:
    """Markdown rows: one per label in ``rows``; ``columns`` = (metric key, header); – where missing."""
    columns = list(columns)
    out = ["| run | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, vals in rows.items():
        out.append(f"| {label} | " + " | ".join(mean_std(vals[k]) if vals.get(k) else "–" for k, _ in columns) + " |")
    return out


def record(rows: dict[str, dict[str, list[float]]], label: str, result: dict[str, Any], keys: Iterable[str]) -> None:
    """Append ``result``'s numeric ``keys`` (those present) to ``rows[label]``."""
    for k in keys:
        if isinstance(result.get(k), int | float):
            rows.setdefault(label, {}).setdefault(k, []).append(float(result[k]))


def paired_table(rows: dict[str, dict[str, list[float]]], claims: Iterable[tuple[str, str]],
                 metric: str = "test_acc") -> list[str]:  # fmt: skip
    """Markdown rows of paired comparisons on ``metric``: one per ``(reference, other)`` claim "other
    beats reference", with the per-seed differences, their mean and 95 % t-interval, the sign count
    and the verdict read from the interval (:func:`raykd.report.paired_comparison`)."""
    out = [f"| claim ({metric}) | per-seed difference | mean [95 % CI], seeds up: verdict |", "|---|---|---|"]
    for ref, other in claims:
        a, b = rows.get(ref, {}).get(metric, []), rows.get(other, {}).get(metric, [])
        if not a or len(a) != len(b):
            continue
        c = paired_comparison(a, b)
        diffs = " ".join(f"{d:+.4f}" for d in c["diffs"])
        out.append(f"| {other} > {ref} | {diffs} | {format_paired(c)} |")
    return out


VERDICT = "**Verdict"


def write_section(section: str, text: str) -> None:
    """Replace (or append) the ``section`` heading's block of docs/results.md with ``text``.

    A hand-written verdict in the old block (from a line starting ``**Verdict`` to the next heading)
    is kept after the new text, and a line says to re-read it against the new figures."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Accuracy results\n"
    head, found, rest = old.partition(section)
    block, tail = (rest.split("\n## ", 1) + [""])[:2] if found else ("", "")
    verdict = block[block.find("\n" + VERDICT) + 1 :].strip() if "\n" + VERDICT in block else ""
    body = text.rstrip() + ("\n\n" + verdict if verdict and VERDICT not in text else "")
    RESULTS.write_text(head.rstrip() + "\n\n" + body + "\n" + ("\n## " + tail if tail else ""))
    print(f"written to {RESULTS}")
    if verdict and VERDICT not in text:
        print(f"kept the hand-written verdict of '{section}': re-read it against the new figures")


def publish(section: str, description: str, rows: dict[str, dict[str, list[float]]],
            columns: Iterable[tuple[str, str]], args: argparse.Namespace, started: float,
            claims: Iterable[tuple[str, str]] = (), metric: str = "test_acc", extra: str = "") -> str:  # fmt: skip
    """Print the section (heading, ``description``, the command that made it and its wall time, the
    table, the paired comparisons of ``claims`` and ``extra`` text) and, with ``--write``, put it into
    docs/results.md.  Returns its text."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [section, "", f"{description} Command: `{command}` ({time.time() - started:.0f} s on this machine).", "",
             *table(rows, columns)]  # fmt: skip
    claims = list(claims)
    if claims:
        lines += ["", "Paired by seed (same split, initialisation and batches), 95 % t-interval of the mean "
                  "difference; the verdict is read from the interval: above 0 holds, below 0 does not hold, "
                  "containing 0 inconclusive.", "", *paired_table(rows, claims, metric)]  # fmt: skip
    if extra:
        lines += ["", extra]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.write:
        write_section(section, text)
    return text
