"""The live progress of a study or ablation: one line per trial event and a compact table; and
:class:`NoTuneEvents`, which keeps Tune from writing TensorBoard files of its own."""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from raykd.report import format_mean_std, ranked_indices
from raykd.tune.space import short_names


class NoTuneEvents(TBXLoggerCallback):
    """In place of Tune's TensorBoard logger (which Tune adds unless one is given): Tune's event files
    are keyed by its report counter, while every trial writes its own, keyed by the training step, in
    ``trials/<id>/tb/`` (:mod:`raykd.train.events`); without this, ``tensorboard --logdir
    runs/<name>`` would show every curve twice on two different x axes."""

    def log_trial_start(self, trial) -> None:
        pass

    def log_trial_result(self, iteration, trial, result) -> None:
        pass

    def log_trial_end(self, trial, failed: bool = False) -> None:
        pass


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def render_table(rows: list[dict[str, Any]], keys: list[str], metric: str, mode: str, steps: int,
                 spread: str | None = None) -> str:  # fmt: skip
    """A compact table: trial, state, the searched knobs (short names), step, metric; the best trial
    (by :func:`raykd.report.rank_trials`, the ranking export uses) marked ``*``; a ``cost`` column
    (device-seconds so far, with the kind) when some row carries a ``cost`` record; with seed
    repeats (``spread``: the metric averaged over the seeds), a ``<spread> mean ± std (n)`` column
    (a row's ``spread``) and, when rows carry ``seeds_done``, how many of its seeds finished."""
    names = short_names(keys)
    scored = [r for r in rows if _finite(r.get("metric"))]
    as_records = [{"state": r["state"].lower(), "metrics": {metric: r.get("metric")}} for r in rows]
    ranked = ranked_indices(as_records, metric, mode)
    best = rows[ranked[0]] if ranked else None
    costed = any(r.get("cost") for r in rows)
    spread_col = f"{spread} mean ± std (n)" if spread else None
    counted = any(r.get("seeds_done") for r in rows)
    header = ["", "trial", "state", *names.values(), "step", metric, *([spread_col] if spread_col else []),
              *(["seeds"] if counted else []), *(["cost"] if costed else [])]  # fmt: skip
    body = []
    for r in rows:
        step, cost = r.get("step"), r.get("cost")
        body.append(["*" if r is best else "", r["trial_id"], r["state"], *(_fmt(r["params"].get(k, "")) for k in keys),
                     f"{step}/{steps}" if step is not None else "-",
                     f"{r['metric']:.4f}" if r in scored else "-"])  # fmt: skip
        if spread_col:
            mean, std, n = r.get("spread") or (None, None, None)
            body[-1].append(format_mean_std(mean, std, n=n) if _finite(mean) else "-")
        if counted:
            done = r.get("seeds_done")
            body[-1].append(f"{done[0]}/{done[1]} done" if done else "-")
        if costed:
            body[-1].append(f"{cost['device_s']:.4g} {cost.get('device', '')}-s" if cost else "-")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    return "\n".join(lines)


class ProgressTable(Callback):
    """Tune callback printing one line per trial event and a compact table every ``every_s`` seconds."""

    def __init__(self, keys: list[str], metric: str, mode: str, steps: int, every_s: float = 20.0,
                 spread: str | None = None):  # fmt: skip
        self.keys, self.metric, self.mode, self.steps, self.every_s = keys, metric, mode, steps, every_s
        self.spread = spread  # with seed repeats: the metric whose mean ± std over the seeds is shown
        self._rows: dict[str, dict[str, Any]] = {}
        self._last_print = 0.0
        self._dirty = False

    def _row(self, trial) -> dict[str, Any]:
        row = self._rows.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "state": "PENDING", "params": {},
                                                     "step": None, "metric": None})  # fmt: skip
        row["params"] = {k: trial.config.get(k) for k in self.keys}
        return row

    def _print_table(self, force: bool = False) -> None:
        if not self._rows or not (force or (self._dirty and time.time() - self._last_print >= self.every_s)):
            return
        print(render_table(list(self._rows.values()), self.keys, self.metric, self.mode, self.steps,
                           getattr(self, "spread", None)), flush=True)  # fmt: skip
        self._last_print, self._dirty = time.time(), False

    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "RUNNING"
        knobs = " ".join(f"{n}={_fmt(row['params'][k])}" for k, n in short_names(self.keys).items())
        print(f"trial {trial.trial_id} started: {knobs}", flush=True)
        self._dirty = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["step"], row["metric"] = result.get("step"), result.get(self.metric)
        if getattr(self, "spread", None):
            m = self.spread
            row["spread"] = (result.get(m), result.get(f"{m}_std"), result.get("n_seeds"))
        self._dirty = True
        self._print_table()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["state"] = "done" if row.get("step") == self.steps else "stopped"
        what = "finished" if row["state"] == "done" else f"stopped early by the scheduler at step {row.get('step')}"
        value = f"{row['metric']:.4f}" if isinstance(row.get("metric"), float) else "-"
        if row.get("spread") and _finite(row["spread"][0]):
            value += f" ({self.spread} {format_mean_std(*row['spread'][:2], n=row['spread'][2])})"
        print(f"trial {trial.trial_id} {what}: {self.metric} {value}", flush=True)
        self._dirty = True
        self._print_table()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "ERROR"
        print(f"trial {trial.trial_id} failed; its error is in {trial.local_path}/error.txt", flush=True)
        self._dirty = True

    def on_experiment_end(self, trials, **info):
        self._print_table(force=True)


