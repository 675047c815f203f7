"""Tables (CSV / Markdown) and plots (matplotlib PNG) for finished ablations and studies.

Both reports take a list of *trial records*, plain dicts with ``trial_id``, ``state`` (``"done"``,
``"running"``, ``"stopped"`` (early-stopped by ASHA), ``"error"``, ``"pending"``), ``params`` (the
searched or grid knobs, plus ``"seed"`` for an ablation), ``metrics`` (final or last reported values;
keys may be missing) and ``history`` (every evaluation, in order).

Files written by :func:`write_ablation_report` (into ``out_dir``):

- ``ablation.csv``: one row per grid cell: the knob values, ``n`` (number of *done* seeds) and
  ``<m>_mean`` / ``<m>_std`` (sample std, ddof=1; empty for one seed, where it is undefined, and for
  none) for the chosen metric and each of ``test_acc_at_best_val``, ``best_val_acc``, ``val_acc``,
  ``mask_rate``, ``pseudo_acc`` that some record reports.
- ``ablation.md``: the same as a Markdown table with "mean ± std" cells; a value from one seed is
  written ``0.8500 (n=1)``, without ±, and a metric that fewer seeds reported than the cell's ``n``
  names its own count.
- ``ablation.png``: the chosen metric (and ``test_acc_at_best_val``) against the first knob, with
  std error bars (none for one seed) and each point's ``n``; one line per value of the second knob
  for a 2-D grid.  The x axis is logarithmic for a knob declared log-scaled (``log_keys``) or a
  positive grid spanning 20× or more.

Files written by :func:`write_study_report`:

- ``study_trials.csv`` (one row per trial, in record order) and ``study.md`` (best first, best trial
  marked ``*``); the evaluated model's ``params``, ``macs`` and ``latency_ms`` where reported, and what
  each trial cost (``wall_s``, ``device_s``, from a record's ``cost``) with the total (and the budget)
  in a "What the study cost" section of ``study.md``.
- ``metric_vs_<key>.png`` per search key (a logarithmic x axis for the keys searched on a log scale,
  ``loguniform`` / ``logint``), ``history.png`` (metric per trial with the running best), and
  ``importance.png`` (Optuna's fANOVA parameter importances) once at least
  :data:`MIN_IMPORTANCE_TRIALS` trials completed; below that (or when Optuna cannot compute them)
  ``study.md`` says why it is absent: importances from a handful of trials are noise.

Which metric is which: the chosen metric (e.g. ``test_acc``) is the value of the *final* evaluation
(the last reported one for trials that did not finish); ``test_acc_at_best_val`` is the test accuracy
of the evaluation that had the best validation accuracy, i.e. model selection without looking at the
test set; ``best_val_acc`` is that best validation accuracy.

Cell and category order: numeric knob values are sorted numerically; other values (strings, bools)
keep the order in which they first appear in the records (the grid's order).  The best study trial is
the first of :func:`ranked_indices` — the one ranking that ``study status``, ``study.md`` and
``study export`` share: full-budget trials before early-stopped ones, failed trials and non-finite
values never, ties to the earlier record.
"""

from __future__ import annotations

import csv
import math
import numbers
import statistics
import warnings
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

#: Metrics reported next to the chosen one when some record has them (in this column order).
EXTRA_ABLATION_METRICS = ("test_acc_at_best_val", "best_val_acc", "val_acc", "mask_rate", "pseudo_acc")
#: Extra columns of the study table when some record has them.
EXTRA_STUDY_METRICS = ("test_acc", "val_acc", "test_acc_at_best_val", "params", "macs", "latency_ms")
BEST_ON_VAL = "test_acc_at_best_val"
#: COMPLETE Optuna trials needed before parameter importances are computed and drawn (fewer: noise)
MIN_IMPORTANCE_TRIALS = 10
DPI = 120
_STATE_STYLE = {  # state -> (marker, filled, colour)
    "done": ("o", True, "tab:blue"),
    "stopped": ("o", False, "tab:blue"),
    "running": ("s", False, "tab:gray"),
    "error": ("x", True, "tab:red"),
}


# ----------------------------------------------------------------------------------------- helpers
# ------------------------------------------------------------------------------------- statistics
def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_comparison(reference: Sequence[float], other: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Paired comparison of two arms measured on the same seeds (``other[i]`` and ``reference[i]``
    share seed i): the per-seed differences ``other − reference``, their mean, a two-sided ``level``
    t-interval, the sign count, and the verdict read from the interval for the claim "other beats
    reference": ``holds`` (the interval is above 0), ``does not hold`` (below 0) or ``inconclusive``
    (it contains 0, or fewer than two seeds)."""
    if len(reference) != len(other):
        raise ValueError(f"paired arms need the same seeds: {len(reference)} vs {len(other)} values")
    diffs = [float(b) - float(a) for a, b in zip(reference, other, strict=True)]
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else float("nan")
    lo = hi = float("nan")
    if n >= 2:
        half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
        lo, hi = mean - half, mean + half
    verdict = "inconclusive"
    if n >= 2 and lo > 0:
        verdict = "holds"
    elif n >= 2 and hi < 0:
        verdict = "does not hold"
    return {"n": n, "diffs": diffs, "mean": mean, "lo": lo, "hi": hi, "level": level,
            "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs), "verdict": verdict}  # fmt: skip


#: how a study with ``tune.repeats`` turns a configuration's per-seed values into the one figure it
#: selects on (:func:`seed_aggregate`)
AGGREGATES = ("mean", "mean_minus_std", "lower_ci")


def seed_aggregate(values: Sequence[float], how: str = "mean", mode: str = "max", level: float = 0.95) -> float:
    """One figure for a configuration trained with several seeds, from its per-seed ``values``.

    ``mean``: the mean.  ``mean_minus_std``: the mean moved one sample standard deviation (ddof=1)
    towards worse, i.e. ``mean − std`` when ``mode`` is ``"max"`` and ``mean + std`` when it is
    ``"min"``.  ``lower_ci``: the worse end of the two-sided ``level`` t-interval of the mean,
    ``mean ∓ t(0.5 + level/2, n − 1) · std / √n``.  Both spread-aware aggregates favour a
    configuration that is good on every seed over one that is lucky on one; they need two values
    or more."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {how!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values to aggregate")
    mean = statistics.fmean(xs)
    if how == "mean":
        return mean
    if len(xs) < 2:
        raise ValueError(f"{how} needs two values or more (a spread), got {len(xs)}")
    spread = statistics.stdev(xs)
    if how == "lower_ci":
        spread *= t_quantile(0.5 + level / 2, len(xs) - 1) / math.sqrt(len(xs))
    return mean - spread if mode == "max" else mean + spread


def format_paired(c: dict[str, Any], digits: int = 4) -> str:
    """``+0.0123 [+0.0040, +0.0206], 5/5 seeds up: holds`` (the interval at ``c['level']``)."""
    if c["n"] < 2:
        return f"{c['mean']:+.{digits}f} (n={c['n']}: no interval): inconclusive"
    return (f"{c['mean']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}], "
            f"{c['wins']}/{c['n']} seeds up: {c['verdict']}")  # fmt: skip


def metric_note(metric: str) -> str:
    """One line saying which metric is which, for the Markdown reports."""
    best_on_val = (
        f"`{BEST_ON_VAL}` = test accuracy of the evaluation that had the best validation accuracy "
        "(selection without looking at the test set)."
    )
    if metric == BEST_ON_VAL:
        return best_on_val
    return f"`{metric}` = value at the final evaluation (last reported for unfinished trials); {best_on_val}"


def format_mean_std(mean: float | None, std: float | None, digits: int = 4, n: int | None = None) -> str:
    """``"0.8500 ± 0.0707"``; ``"0.8500 (n=1)"`` for one sample (no spread to show); an empty string
    when there is no mean (no finished seed).  ``n``, when given, is the number of samples and is
    written after the value (``"0.8500 ± 0.0707 (n=2)"``)."""
    if mean is None:
        return ""
    count = f" (n={n})" if n is not None else ""
    if n == 1 or std is None:
        return f"{mean:.{digits}f}{count}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{count}"


def format_value(value: Any) -> str:
    """Short display form of a knob or metric value (floats with 4 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` in cells is escaped."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(headers), "|" + "|".join("---" for _ in headers) + "|"]
    out.extend(line(r) for r in rows)
    return "\n".join(out) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (missing, NaN, non-numeric)."""
    if _is_number(value) and math.isfinite(float(value)):
        return float(value)
    return None


def _value_key(value: Any) -> tuple[str, Any]:
    """Hashable identity of a knob value that keeps ``True`` and ``1`` apart but ``1`` and ``1.0`` together."""
    if isinstance(value, bool):
        return ("bool", value)
    if _is_number(value):
        return ("num", float(value))
    return ("other", repr(value) if isinstance(value, list | dict) else value)


def ordered_values(values: Iterable[Any]) -> list[Any]:
    """Distinct values: numeric order when all are numbers, else order of first appearance."""
    seen: dict[tuple[str, Any], Any] = {}
    for v in values:
        seen.setdefault(_value_key(v), v)
    distinct = list(seen.values())
    if distinct and all(_is_number(v) for v in distinct):
        distinct.sort(key=float)
    return distinct


def _x_positions(values: Sequence[Any], log: bool | None = None) -> tuple[list[float], bool, list[str] | None]:
    """Plot positions for knob values: ``(xs, log_axis, tick_labels or None)``.  ``log``: True for a
    knob on a log scale, False for a linear one, None to decide from the values (positive and
    spanning 20× or more); a log axis needs positive values."""
    if values and all(_is_number(v) for v in values):
        xs = [float(v) for v in values]
        if log is None:
            log = min(xs) > 0 and max(xs) / min(xs) >= 20
        return xs, bool(log) and min(xs) > 0, None
    return [float(i) for i in range(len(values))], False, [format_value(v) for v in values]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _set_x_axis(ax, xs: list[float], log: bool, labels: list[str] | None) -> None:
    if labels is not None and xs:
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.5, len(xs) - 0.5)
    elif log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # 0.01, 0.02, 0.03, 0.05: plain numbers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())


def _grid_ticks(ax, xs: list[float], values: Sequence[Any], log: bool, notes: dict[float, str] | None = None) -> bool:
    """Ticks at a numeric grid's values (when few), and x limits covering the whole grid; ``notes``
    (x -> text) go under the tick labels.  Returns whether the ticks are the grid's values."""
    notes = notes or {}
    if xs and not all(_is_number(v) for v in values):  # categories: the labels _set_x_axis set
        ax.set_xticklabels([f"{format_value(v)}\n{notes[x]}" if x in notes else format_value(v)
                            for x, v in zip(xs, values, strict=True)])  # fmt: skip
        return True
    if not xs:
        return False
    lo, hi = min(xs), max(xs)
    if log:
        ax.set_xlim(lo / 1.3, hi * 1.3)
    else:
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 0.5)
        ax.set_xlim(lo - pad, hi + pad)
    if len(xs) <= 12:
        ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{format_value(v)}\n{notes[x]}" if x in notes else format_value(v)
                            for x, v in zip(xs, values, strict=True)])  # fmt: skip
        return True
    return False


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _write_csv(path: Path, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)
    return path


def _csv_value(value: Any) -> Any:
    """CSV cell: empty for missing, floats with 10 significant digits (``0.65``, not ``0.6499999999999999``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(float(f"{value:.10g}"))
    return value


def _metrics(record: dict) -> dict:
    return record.get("metrics") or {}


def _present(records: Sequence[dict], names: Iterable[str]) -> list[str]:
    return [m for m in names if any(m in _metrics(r) for r in records)]


# ---------------------------------------------------------------------------------------- ablation
def aggregate_ablation(records: Sequence[dict], knobs: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean and std over seeds per grid cell, from records with state ``"done"`` only.

    Args:
        records: trial records; every record's params hold each knob.
        knobs: the grid's knob names (1 or 2).
        metrics: metric names to aggregate.

    Returns:
        One dict per cell, ordered by knob values: ``{"values": tuple, "n": int,
        "stats": {metric: (mean, std, count)}}``: ``count`` seeds reported the metric; ``std`` is None
        below two, ``mean`` None for none.
    """
    axes = [ordered_values(r["params"][k] for r in records) for k in knobs]
    rank = [{_value_key(v): i for i, v in enumerate(vals)} for vals in axes]
    cells: dict[tuple, dict] = {}
    for r in records:
        values = tuple(r["params"][k] for k in knobs)
        key = tuple(_value_key(v) for v in values)
        cell = cells.setdefault(key, {"values": values, "n": 0, "samples": {m: [] for m in metrics}})
        if r.get("state") != "done":
            continue
        cell["n"] += 1
        for m in metrics:
            x = _number(_metrics(r).get(m))
            if x is not None:
                cell["samples"][m].append(x)
    out = []
    for key in sorted(cells, key=lambda k: tuple(rank[i][part] for i, part in enumerate(k))):
        cell = cells[key]
        stats = {}
        for m, xs in cell.pop("samples").items():
            mean = statistics.fmean(xs) if xs else None
            stats[m] = (mean, statistics.stdev(xs) if len(xs) > 1 else None, len(xs))
        out.append({**cell, "stats": stats})
    return out


def paired_cells(records: Sequence[dict], knobs: Sequence[str], metric: str,
                 reference: Sequence[Any]) -> list[dict]:  # fmt: skip
    """Every grid cell but ``reference`` (a value per knob) against it, paired by seed: the seeds
    finished (state ``done``) in both cells, ``other − reference`` per seed, and
    :func:`paired_comparison`'s mean, 95 % t-interval, sign count and verdict.  One dict per cell, in
    :func:`aggregate_ablation`'s order: ``{"values", "comparison"}`` (``comparison`` None when no
    seed is shared)."""
    def key(values: Sequence[Any]) -> tuple:
        return tuple(_value_key(v) for v in values)

    by_cell: dict[tuple, dict[Any, float]] = {}
    for r in records:
        x = _number(_metrics(r).get(metric))
        if r.get("state") == "done" and x is not None:
            by_cell.setdefault(key([r["params"][k] for k in knobs]), {})[r["params"].get("seed")] = x
    ref = by_cell.get(key(reference), {})
    out = []
    for cell in aggregate_ablation(records, knobs, []):
        if key(cell["values"]) == key(reference):
            continue
        other = by_cell.get(key(cell["values"]), {})
        seeds = [s for s in ref if s in other]
        comparison = paired_comparison([ref[s] for s in seeds], [other[s] for s in seeds]) if seeds else None
        out.append({"values": cell["values"], "comparison": comparison})
    return out


def write_ablation_report(
    records: Sequence[dict], knobs: list[str], metric: str, out_dir: str | Path, log_keys: Collection[str] = (),
    reference: Sequence[Any] | None = None,
) -> dict[str, Path]:
    """Write ``ablation.csv``, ``ablation.md`` and ``ablation.png`` for a grid of knob values × seeds.

    Args:
        records: trial records; params hold each knob and ``"seed"``.
        knobs: 1 or 2 dotted knob names; the first is the x axis, the second (if any) gives one line per value.
        metric: the ablation's chosen metric (e.g. ``"test_acc"``).
        out_dir: folder to write into (created if needed).
        log_keys: knobs declared on a log scale (their axis is logarithmic whatever the grid).
        reference: the grid cell (a value per knob) every other cell is compared with, paired by
            seed (:func:`paired_cells`): ``vs_ref_*`` columns in the CSV and a "Paired against"
            table in the Markdown.

    Returns:
        ``{"csv": path, "md": path, "png": path}``.
    """
    if not 1 <= len(knobs) <= 2:
        raise ValueError(f"an ablation report takes 1 or 2 knobs, got {knobs!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [metric] + _present(records, (m for m in EXTRA_ABLATION_METRICS if m != metric))
    cells = aggregate_ablation(records, knobs, metrics)

    headers = [*knobs, "n"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    paired = {tuple(_value_key(v) for v in p["values"]): p["comparison"]
              for p in (paired_cells(records, knobs, metric, reference) if reference is not None else [])}  # fmt: skip
    if reference is not None:
        headers += ["vs_ref_n", "vs_ref_mean", "vs_ref_lo", "vs_ref_hi", "vs_ref_wins", "vs_ref_verdict"]
    csv_rows = []
    for c in cells:
        row = [*c["values"], c["n"]]
        for m in metrics:
            mean, std, _ = c["stats"][m]
            row += [_csv_value(mean), _csv_value(std)]
        if reference is not None:
            p = paired.get(tuple(_value_key(v) for v in c["values"]))
            is_ref = tuple(_value_key(v) for v in c["values"]) == tuple(_value_key(v) for v in reference)
            row += (["reference", "", "", "", "", ""] if is_ref else ["", "", "", "", "", ""] if p is None else
                    [p["n"], _csv_value(p["mean"]), _csv_value(p["lo"]), _csv_value(p["hi"]), p["wins"],
                     p["verdict"]])  # fmt: skip
        csv_rows.append(row)
    paths = {"csv": _write_csv(out / "ablation.csv", headers, csv_rows)}

    def md_cell(c: dict, m: str) -> str:
        mean, std, count = c["stats"][m]
        return format_mean_std(mean, std, n=count if count == 1 or count != c["n"] else None)

    md_rows = [[*(format_value(v) for v in c["values"]), c["n"], *(md_cell(c, m) for m in metrics)] for c in cells]
    title = f"# Ablation: {' × '.join(knobs)}\n\n"
    body = (f"Mean ± sample std over finished seeds (`n`); a value from one seed is marked `(n=1)` and has "
            f"no ±. {metric_note(metric)}\n\n")  # fmt: skip
    text = title + body + markdown_table([*knobs, "n", *metrics], md_rows)
    if reference is not None:
        ref_name = ", ".join(f"{k} = {format_value(v)}" for k, v in zip(knobs, reference, strict=True))
        text += (f"\n## Paired against {ref_name}\n\nEach cell's `{metric}` minus the reference's on the same seed "
                 "(seeds finished in both): the mean difference, its 95 % t-interval, how many seeds went up, "
                 "and the verdict on \"this cell beats the reference\" read from the interval (`holds`: above 0, "
                 "`does not hold`: below 0, `inconclusive`: it contains 0, or fewer than 2 seeds).\n\n")  # fmt: skip
        rows = []
        for c in cells:
            p = paired.get(tuple(_value_key(v) for v in c["values"]))
            if tuple(_value_key(v) for v in c["values"]) == tuple(_value_key(v) for v in reference):
                continue
            rows.append([*(format_value(v) for v in c["values"]), p["n"] if p else 0,
                         format_paired(p) if p else "no seed finished in both"])  # fmt: skip
        text += markdown_table([*knobs, "seeds paired", f"{metric} − reference [95 % CI], seeds up: verdict"], rows)
    paths["md"] = out / "ablation.md"
    paths["md"].write_text(text, encoding="utf-8")

    with_best = BEST_ON_VAL in metrics and metric != BEST_ON_VAL
    paths["png"] = _plot_ablation(cells, knobs, metric, with_best, out, log=True if knobs[0] in log_keys else None)
    return paths


def _spread_note(cells: list[dict], metric: str) -> str:
    """The title's note on error bars: what they are, or that one seed has none."""
    counts = [c["stats"][metric][2] for c in cells if c["stats"][metric][0] is not None]
    if counts and max(counts) == 1:
        return "one seed: no error bars"
    return "mean ± std over n seeds"


def _annotate_n(ax, px: list[float], py: list[float], pn: list[int]) -> None:
    """``n=<seeds>`` to the right of each point (clear of its error bar)."""
    for x, y, n in zip(px, py, pn, strict=True):
        ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(7, 0), ha="left", va="center",
                    fontsize="small", color="dimgray", bbox={"boxstyle": "square,pad=0.1", "fc": "white",
                    "ec": "none", "alpha": 0.7})  # fmt: skip


def _plot_ablation(cells: list[dict], knobs: Sequence[str], metric: str, with_best: bool, out: Path,
                   log: bool | None = None) -> Path:  # fmt: skip
    plt = _pyplot()
    x_values = ordered_values(c["values"][0] for c in cells)
    xs, log, labels = _x_positions(x_values, log)
    x_of = {_value_key(v): x for v, x in zip(x_values, xs, strict=True)}

    def series(m: str, line_value_key=None) -> tuple[list[float], list[float], list[float], list[int]]:
        px, py, pe, pn = [], [], [], []
        for c in cells:
            if line_value_key is not None and _value_key(c["values"][1]) != line_value_key:
                continue
            mean, std, count = c["stats"][m]
            if mean is not None:
                px.append(x_of[_value_key(c["values"][0])])
                py.append(mean)
                pe.append(std if std is not None else 0.0)  # one seed: no bar
                pn.append(count)
        return px, py, pe, pn

    shown = [metric, BEST_ON_VAL] if with_best else [metric]
    note = _spread_note(cells, metric)
    if len(knobs) == 1:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m, fmt in zip(shown, ("o-", "s--"), strict=False):
            px, py, pe, _ = series(m)
            ax.errorbar(px, py, yerr=pe, fmt=fmt, capsize=4, label=m)
        ax.set_ylabel(" / ".join(shown))
        ax.set_title(f"{metric} vs {knobs[0]} ({note})")
        if len(shown) > 1:
            ax.legend()
        _set_x_axis(ax, xs, log, labels)
        px, py, _, pn = series(metric)
        if not _grid_ticks(ax, xs, x_values, log, {x: f"n={n}" for x, n in zip(px, pn, strict=True)}):
            _annotate_n(ax, px, py, pn)  # too many values for a tick each: beside the points
        ax.set_xlabel(knobs[0])
        ax.grid(alpha=0.3)
        return _save(fig, out / "ablation.png")

    line_values = ordered_values(c["values"][1] for c in cells)
    fig, axs = plt.subplots(1, len(shown), figsize=(6.4 * len(shown), 4.4), sharey=True, squeeze=False)
    for ax, m in zip(axs[0], shown, strict=True):
        for v in line_values:
            px, py, pe, pn = series(m, _value_key(v))
            ax.errorbar(px, py, yerr=pe, fmt="o-", capsize=4, label=format_value(v))
            _annotate_n(ax, px, py, pn)
        ax.set_title(f"{m} vs {knobs[0]} ({note})")
        ax.set_xlabel(knobs[0])
        ax.set_ylabel(m)
        _set_x_axis(ax, xs, log, labels)
        _grid_ticks(ax, xs, x_values, log)
        lo, hi = ax.get_xlim()  # room for the last points' n on the right
        ax.set_xlim(lo, hi * 1.15 if log else hi + 0.06 * (hi - lo))
        ax.grid(alpha=0.3)
        if len(line_values) > 1:
            ax.legend(title=knobs[1])
    return _save(fig, out / "ablation.png")


# ------------------------------------------------------------------------------------------- study
def _step(record: dict) -> Any:
    step = _metrics(record).get("step")
    if step is None and record.get("history"):
        step = record["history"][-1].get("step")
    return step


#: trial states that are never selected, whatever they reported
UNSELECTABLE = ("error", "failed")


def ranked_indices(records: Sequence[dict], metric: str, mode: str) -> list[int]:
    """The one ranking of study trials that ``study status``, ``study.md``, the live table and
    ``study export`` all use: indices of the selectable records, best first.

    A record is selectable when its ``metric`` is a finite number and its state is not failed.
    Trials that ran the full budget (state ``done``) rank before the others (stopped early by the
    scheduler, running, interrupted), so the exported config reproduces its figure when re-run with
    its own budget; within each group ``mode`` (``"max"`` / ``"min"``) orders by the metric, and ties
    keep the records' order (the order in which the trials started).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0
    scored = []
    for i, r in enumerate(records):
        x = _number(_metrics(r).get(metric))
        if x is None or not math.isfinite(x) or r.get("state") in UNSELECTABLE:
            continue
        scored.append((r.get("state") != "done", sign * x, i))
    return [i for *_, i in sorted(scored)]


def rank_trials(records: Sequence[dict], metric: str, mode: str) -> list[dict]:
    """The selectable records, best first (see :func:`ranked_indices`)."""
    return [records[i] for i in ranked_indices(records, metric, mode)]


def pareto_indices(records: Sequence[dict], objectives: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the Pareto set of a multi-objective study, in record order.

    ``objectives`` are ``(metric, mode)`` pairs.  Candidates are the records that finished the full
    budget (state ``done``) with a finite value of every objective.  A candidate is dominated when
    another one is at least as good on every objective and strictly better on one; the Pareto set is
    the candidates that nothing dominates.  Trials with equal values on every objective dominate
    neither other: all of them are in the set when one is.
    """
    for _, mode in objectives:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    points: dict[int, tuple[float, ...]] = {}
    for i, r in enumerate(records):
        values = [_number(_metrics(r).get(m)) for m, _ in objectives]
        if r.get("state") == "done" and all(v is not None for v in values):
            points[i] = tuple(v if mode == "max" else -v for v, (_, mode) in zip(values, objectives, strict=True))

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))

    return [i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)]


#: axis labels with units for the metrics of a Pareto plot
UNITS = {"params": "parameters", "macs": "multiply-accumulates per image", "latency_ms": "ms per image (batch 1)",
         "img_per_s": "images / s", "loss": "training loss"}  # fmt: skip


def axis_label(metric: str, mode: str) -> str:
    """``val_acc (fraction correct, higher is better)``: the metric, its unit and its direction."""
    unit = UNITS.get(metric, "fraction correct" if metric.endswith("_acc") or "_acc_" in metric else "")
    better = "higher" if mode == "max" else "lower"
    return f"{metric} ({unit + ', ' if unit else ''}{better} is better)"


def best_index(records: Sequence[dict], metric: str, mode: str) -> int | None:
    """Index of the best record by :func:`ranked_indices`, ``None`` if no record is selectable."""
    ranked = ranked_indices(records, metric, mode)
    return ranked[0] if ranked else None


def write_study_report(
    records: Sequence[dict],
    search_keys: list[str],
    metric: str,
    mode: str,
    out_dir: str | Path,
    optuna_storage: str | None = None,
    study_name: str | None = None,
    log_keys: Collection[str] | None = None,
    budget_hours: float | None = None,
    objectives: Sequence[tuple[str, str]] | None = None,
    spread: str | None = None,
) -> dict[str, Path]:
    """Write the study's trial table, per-knob scatter plots, history plot and (if possible) importances.

    Args:
        records: trial records, in trial order.
        search_keys: the searched knobs' dotted names.
        metric: the study's metric; ``mode`` (``"max"`` / ``"min"``) says which way is better.
        out_dir: folder to write into (created if needed).
        optuna_storage: Optuna storage URL (``"sqlite:///.../optuna.db"``) for parameter importances.
        study_name: the Optuna study's name in that storage.
        log_keys: the search keys sampled on a log scale (``loguniform``, ``logint``): their plots get
            a logarithmic x axis and the others a linear one; None = decide from the values.
        budget_hours: the study's ``tune.budget_hours`` (named beside the spend), or None.
        objectives: ``(metric, mode)`` pairs of a multi-objective study: ``study.md`` gets its
            Pareto set (:func:`pareto_indices`) and ``pareto.png`` is drawn (the first objective
            against the second).
        spread: in a study with seed repeats, the metric whose mean (``<spread>``), sample std
            (``<spread>_std``) and seed count (``n_seeds``) get columns, and whose per-seed values get
            a "Seeds" section (records carry ``seeds``, :func:`raykd.tune.records.seed_records`).

    Returns:
        Paths by key: ``"csv"``, ``"md"``, ``"history"``, ``"metric_vs_<key>"`` per search key and
        ``"importance"`` when it was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = best_index(records, metric, mode)  # the same trial `study status` stars and `study export` writes
    spread_cols = [spread, f"{spread}_std", "n_seeds", "test_acc_std"] if spread else []
    extras = _present(records, dict.fromkeys(m for m in [*spread_cols, *EXTRA_STUDY_METRICS] if m != metric))
    costed = any(r.get("cost") for r in records)
    cost_cols = ["wall_s", "device_s"] if costed else []
    headers = ["trial_id", "state", *search_keys, "step", metric, *extras, *cost_cols]

    def row(r: dict) -> list:
        params, mets, cost = r.get("params") or {}, _metrics(r), r.get("cost") or {}
        return [
            r.get("trial_id", ""),
            r.get("state", ""),
            *(params.get(k) for k in search_keys),
            _step(r),
            *(mets.get(m) for m in [metric, *extras]),
            *(cost.get(c) for c in cost_cols),
        ]

    raw = [row(r) for r in records]
    paths = {"csv": _write_csv(out / "study_trials.csv", headers, ([_csv_value(v) for v in r] for r in raw))}

    def md_row(values: list) -> list[str]:
        n_fixed = 3 + len(search_keys)  # trial_id, state, knobs, step: short form; metrics: 4 decimals
        return [format_value(v) for v in values[:n_fixed]] + [
            f"{v:.4f}" if isinstance(v, float) and _number(v) is not None else format_value(v)
            for v in values[n_fixed:]
        ]

    ranked = ranked_indices(records, metric, mode)
    order = ranked + [i for i in range(len(records)) if i not in ranked]  # best first, unranked last
    md_rows = [["*" if i == best else "", *md_row(raw[i])] for i in order]
    text = f"# Study trials ({metric}, {mode})\n\n`*` = best trial. {metric_note(metric)}\n\n"
    text += markdown_table(["best", *headers], md_rows)
    if spread:
        text += seeds_section(records, [records[i] for i in order], spread, metric)
    if costed:
        text += cost_section(records, budget_hours)
    if objectives and len(objectives) >= 2:
        front = pareto_indices(records, objectives)
        names = [m for m, _ in objectives]
        text += (f"\n## Pareto set ({', '.join(f'{m} {mo}' for m, mo in objectives)})\n\n{len(front)} finished "
                 "trial(s) that no other finished trial matches or beats on every objective (`pareto.png`; "
                 "`raykd study export DIR --pareto --out FOLDER` writes one config each):\n\n")  # fmt: skip
        rows = [[records[i].get("trial_id", ""), *(format_value((records[i].get("params") or {}).get(k))
                                                    for k in search_keys),
                 *(format_value(_metrics(records[i]).get(m)) for m in names)] for i in front]  # fmt: skip
        text += markdown_table(["trial_id", *search_keys, *names], rows)
        paths["pareto"] = _plot_pareto(records, objectives, front, out / "pareto.png")

    for key in search_keys:
        name = f"metric_vs_{key.replace('.', '_')}"
        log = None if log_keys is None else key in log_keys
        paths[name] = _plot_metric_vs(records, key, metric, best, out / f"{name}.png", log=log)
    paths["history"] = _plot_history(records, metric, mode, best, out / "history.png")
    if optuna_storage and study_name:
        importances, why = importance_or_reason(optuna_storage, study_name)
        (out / "importance.png").unlink(missing_ok=True)  # never a stale plot from an earlier report
        if importances:
            paths["importance"] = _plot_importance(importances, f"{study_name}, {why}", out / "importance.png")
            rows = [[f"`{k}`", f"{v:.3f}"] for k, v in importances.items()]
            text += f"\n## Parameter importances\n\n{why} (`importance.png`):\n\n"
            text += markdown_table(["parameter", "importance"], rows)
        else:
            text += f"\n## Parameter importances\n\nNo importance plot: {why}.\n"
    paths["md"] = out / "study.md"
    paths["md"].write_text(text, encoding="utf-8")
    return paths


def seeds_section(records: Sequence[dict], ordered: Sequence[dict], spread: str, metric: str) -> str:
    """study.md's "Seeds" section of a study with repeats: each configuration's ``spread`` metric
    on every seed (best first), its mean ± std and the figure it was ranked on."""
    seeds = list(dict.fromkeys(seed for r in records for seed in (r.get("seeds") or {})))
    rows = []
    for r in ordered:
        m = _metrics(r)
        at_step = m.get("seed_values") if isinstance(m.get("seed_values"), dict) else {}
        cells = [format_value(at_step[s]) if at_step.get(s) is not None else "-" for s in seeds]
        rows.append([r.get("trial_id", ""), r.get("state", ""), *cells,
                     format_mean_std(_number(m.get(spread)), _number(m.get(f"{spread}_std")), n=m.get("n_seeds")),
                     *([format_value(m.get(metric))] if metric != spread else [])])  # fmt: skip
    ranked_on = [metric] if metric != spread else []
    text = (f"\n## Seeds\n\nEach configuration was trained with seeds {', '.join(seeds)} (each sets `train.seed` and "
            f"`data.seed`); `{spread}` on each seed at the last step every seed of the configuration reached, the "
            f"mean ± sample std there, and the figure trials are ranked on ({metric}).\n\n")  # fmt: skip
    return text + markdown_table(["trial_id", "state", *(f"seed {s}" for s in seeds), "mean ± std (n)",
                                  *ranked_on], rows)  # fmt: skip


def cost_section(records: Sequence[dict], budget_hours: float | None = None) -> str:
    """The "What the study cost" section of ``study.md``: the total and one line per trial."""
    costs = [(r.get("trial_id", ""), r["cost"]) for r in records if r.get("cost")]
    kinds = sorted({str(c.get("device")) for _, c in costs}, reverse=True)
    unit = "/".join(kinds) or "device"
    total_s = sum(float(c["device_s"]) for _, c in costs)
    text = (f"\n## What the study cost\n\n{total_s / 3600:.4g} {unit}-hours ({total_s:.0f} {unit}-seconds) over "
            f"{len(costs)} trials, {sum(float(c['wall_s']) for _, c in costs):.0f} s of trial wall time")  # fmt: skip
    if budget_hours is not None:
        text += f"; budget {budget_hours:g} {unit}-hours ({100 * total_s / 3600 / budget_hours:.0f}% spent)"
    text += (f". A trial's cost is its wall time × the {unit}s it holds (`{unit}-s`).\n\n")
    rows = [[tid, f"{float(c['wall_s']):.1f}", format_value(c.get("held")), f"{float(c['device_s']):.1f}"]
            for tid, c in costs]  # fmt: skip
    return text + markdown_table(["trial_id", "wall_s", f"{unit}s held", f"{unit}-s"], rows)


def _plot_pareto(records: Sequence[dict], objectives: Sequence[tuple[str, str]], front: list[int],
                 path: Path) -> Path:  # fmt: skip
    """The first objective (y) against the second (x): the Pareto set highlighted and joined, the
    dominated finished trials faded."""
    plt = _pyplot()
    (ym, ymode), (xm, xmode) = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    pts = {i: (_number(_metrics(r).get(xm)), _number(_metrics(r).get(ym))) for i, r in enumerate(records)
           if r.get("state") == "done"}  # fmt: skip
    pts = {i: p for i, p in pts.items() if None not in p}
    dominated = [p for i, p in pts.items() if i not in front]
    if dominated:
        ax.scatter([p[0] for p in dominated], [p[1] for p in dominated], s=36, color="tab:gray", alpha=0.35,
                   label=f"dominated ({len(dominated)})")  # fmt: skip
    on_front = sorted(pts[i] for i in front)
    if on_front:
        ax.plot([p[0] for p in on_front], [p[1] for p in on_front], "-", color="tab:red", alpha=0.6, zorder=3)
        ax.scatter([p[0] for p in on_front], [p[1] for p in on_front], s=70, color="tab:red", edgecolors="black",
                   zorder=4, label=f"Pareto set ({len(on_front)})")  # fmt: skip
        for i in front:
            ax.annotate(str(records[i].get("trial_id", "")), pts[i], textcoords="offset points", xytext=(6, 4),
                        fontsize="x-small", color="dimgray")  # fmt: skip
    xs = [p[0] for p in pts.values()]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    ax.margins(x=0.1, y=0.08)  # room for the trial ids beside the points
    ax.set_xlabel(axis_label(xm, xmode))
    ax.set_ylabel(axis_label(ym, ymode))
    ax.set_title(f"{ym} against {xm}: finished trials")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize="small")
    return _save(fig, path)


def _scatter_by_state(ax, points: list[tuple[float, float, str]]) -> None:
    """Scatter ``(x, y, state)``: done filled, stopped hollow, others by their own marker."""
    for state in ordered_values(p[2] for p in points):
        marker, filled, colour = _STATE_STYLE.get(state, ("^", False, "tab:gray"))
        px = [p[0] for p in points if p[2] == state]
        py = [p[1] for p in points if p[2] == state]
        face = colour if filled else "none"
        ax.scatter(px, py, marker=marker, s=40, facecolors=face, edgecolors=colour, label=state)


def _mark_best(ax, x: float, y: float) -> None:
    ax.scatter([x], [y], marker="*", s=260, c="gold", edgecolors="black", zorder=5, label="best")


def _plot_metric_vs(records: Sequence[dict], key: str, metric: str, best: int | None, path: Path,
                    log: bool | None = None) -> Path:  # fmt: skip
    plt = _pyplot()
    usable = [
        (i, r)
        for i, r in enumerate(records)
        if key in (r.get("params") or {}) and _number(_metrics(r).get(metric)) is not None
    ]
    values = ordered_values(r["params"][key] for _, r in usable)
    xs, log, labels = _x_positions(values, log)
    x_of = {_value_key(v): x for v, x in zip(values, xs, strict=True)}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = [(x_of[_value_key(r["params"][key])], _number(_metrics(r)[metric]), r.get("state", "")) for _, r in usable]
    _scatter_by_state(ax, points)
    for (i, _), p in zip(usable, points, strict=True):
        if i == best:
            _mark_best(ax, p[0], p[1])
    _set_x_axis(ax, xs, log, labels)
    ax.set_xlabel(f"{key} (log scale)" if log else key)
    ax.set_ylabel(f"{metric} (last reported)")
    ax.set_title(f"{metric} vs {key}")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_history(records: Sequence[dict], metric: str, mode: str, best: int | None, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    points, run_x, run_y, current = [], [], [], None
    for i, r in enumerate(records, start=1):
        y = _number(_metrics(r).get(metric))
        if y is None:
            continue
        points.append((float(i), y, r.get("state", "")))
        if current is None or (y > current if mode == "max" else y < current):
            current = y
        run_x.append(float(i))
        run_y.append(current)
    _scatter_by_state(ax, points)
    if run_x:
        ax.step(run_x, run_y, where="post", color="tab:green", label=f"running best ({mode})")
    if best is not None:
        _mark_best(ax, float(best + 1), _number(_metrics(records[best])[metric]))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in order)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="small")
    return _save(fig, path)


def param_importances(
    storage: str, study_name: str, min_trials: int = MIN_IMPORTANCE_TRIALS
) -> dict[str, float] | None:
    """Optuna (fANOVA) parameter importances of a single-objective study, most important first;
    ``None`` (never raises) when :func:`importance_or_reason` gives a reason instead."""
    return importance_or_reason(storage, study_name, min_trials)[0]


def importance_or_reason(
    storage: str, study_name: str, min_trials: int = MIN_IMPORTANCE_TRIALS
) -> tuple[dict[str, float] | None, str]:
    """``(importances, what they rest on)`` or ``(None, why there are none)``: the study cannot be
    loaded, is multi-objective, has fewer than ``min_trials`` COMPLETE trials (importances of a
    handful of trials are noise), has no parameter that varies, or the evaluator fails."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except Exception as e:  # noqa: BLE001 - importances are optional
            return None, f"the Optuna study {study_name!r} could not be loaded ({type(e).__name__})"
        if len(study.directions) != 1:
            return None, "the Optuna study has several objectives"
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < min_trials:
            return None, (f"{len(complete)} completed trial(s); importances need at least {min_trials} "
                          "(from fewer they are noise)")  # fmt: skip
        names = {n for t in complete for n in t.params}
        if not any(len({repr(t.params.get(n)) for t in complete}) > 1 for n in names):
            return None, "no searched parameter varies across the completed trials"
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
        except Exception as e:  # noqa: BLE001 - degenerate trials
            return None, f"Optuna could not compute them ({type(e).__name__})"
        return importances, f"fANOVA over {len(complete)} completed trials"


def _plot_importance(importances: dict[str, float], title: str, path: Path) -> Path:
    plt = _pyplot()
    names = list(importances)[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.45 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, normalised)")
    ax.set_ylabel("parameter")
    ax.set_title(f"Parameter importances ({title})", fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
