"""The run folder: the one module that knows its files.

A run folder (``raykd train``'s ``--out``, a study trial's ``trials/<id>/``, a cached teacher's
``teachers/teacher-<hash>/``) holds::

    config.yaml          the resolved run config (defaults merged); ``raykd train`` re-runs it
    progress.jsonl       one JSON object per evaluation (rank 0 appends; strict JSON: NaN is null)
    result.json          the last evaluation's metrics, written once the run reached train.steps
    failed.json          instead of result.json when the run diverged: the reason and the step
    train/checkpoint_*/  Ray Train's checkpoints (the latest ``train.keep_checkpoints``), each a state.pt
    checkpoints/step_*/  the same for in-process runs (:class:`raykd.train.context.LocalSession`)
    tb/                  TensorBoard event files keyed by the training step (rank 0; ``train.tensorboard``)

Everything else reads and writes these through :class:`RunFolder`: writes of ``config.yaml`` and
``result.json`` are atomic (a temporary file renamed into place), and readers tolerate what a crash
or a full disk leaves behind — an unreadable ``result.json`` or a half-written last line of
``progress.jsonl`` is skipped with one warning naming the file, so one broken trial never breaks a
whole study.  Checkpoint paths recorded in ``result.json`` are relative to the folder, so a folder
can be moved or mounted elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from raykd.config import RunConfig, dump_run_config, parse_run_config
from raykd.errors import ConfigError

CONFIG_FILE = "config.yaml"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
#: written instead of result.json when the run diverged (non-finite or exploding loss or metric)
FAILURE_FILE = "failed.json"
#: the state file inside every checkpoint folder
STATE_FILE = "state.pt"
#: Ray Train's run inside a run folder (its checkpoints are ``train/checkpoint_*``)
TRAIN_RUN_NAME = "train"
#: in-process runs' checkpoints (``checkpoints/step_<N>``)
LOCAL_CHECKPOINTS = "checkpoints"
#: TensorBoard event files (:mod:`raykd.train.events`)
TB_DIR = "tb"

_warned: set[str] = set()


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (each message once per process)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_mapping(path: Path, parse, consequence: str) -> dict[str, Any] | None:
    """``parse`` of the file at ``path`` when it is a mapping; None when the file is missing, and None
    with a warning naming it when it cannot be read (``consequence`` says what that means)."""
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError, OSError) as e:  # JSONDecodeError is a ValueError
        warn(f"skipping {path}: unreadable ({type(e).__name__}){consequence}")
        return None
    return value if isinstance(value, dict) else None


#: keys that may change between a run and its resume: they do not change what the run computes
NOT_COMPARED = ("provenance", "train.max_failures", "train.keep_checkpoints", "train.eval_batch_size",
                "train.tensorboard")


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two raw configs differ, as ``key: old -> new``; None if equal.
    Keys in :data:`NOT_COMPARED` are ignored."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if f"{prefix}{key}" in NOT_COMPARED:
                continue
            diff = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]}: {a!r} -> {b!r}"


class RunFolder:
    """The files of one run folder (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def progress_path(self) -> Path:
        return self.path / PROGRESS_FILE

    @property
    def result_path(self) -> Path:
        return self.path / RESULT_FILE

    # -- config ------------------------------------------------------------------------------

    def write_config(self, cfg: RunConfig) -> str:
        """Write the resolved ``config.yaml``; returns its text."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = dump_run_config(cfg)
        _atomic_write(self.config_path, text)
        return text

    def config_raw(self) -> dict[str, Any] | None:
        """``config.yaml`` as a raw mapping; None when missing or unreadable (with a warning)."""
        return _read_mapping(self.config_path, yaml.safe_load, "")

    def config(self, field: str = "config") -> RunConfig:
        """The validated run config; a missing or invalid one is a ConfigError on ``field``."""
        raw = self.config_raw()
        if raw is None:
            raise ConfigError(field, f"{self.path} is not a raykd run folder (no readable {CONFIG_FILE})")
        return parse_run_config(raw)

    # -- progress ----------------------------------------------------------------------------

    def append_progress(self, record: dict[str, Any]) -> None:
        """Append one evaluation (rank 0 only) as a strict-JSON line, with the wall-clock ``time``."""
        line = json.dumps(json_safe({"time": time.time(), **record}), allow_nan=False)
        with open(self.progress_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_progress(self, step: int) -> None:
        """Drop the evaluations after ``step`` (a restart resumes from the checkpoint of ``step``: the
        rows it will write again must not be there twice)."""
        if not self.progress_path.is_file():
            return
        keep = [row for row in self.progress() if isinstance(row.get("step"), int) and row["step"] <= step]
        text = "".join(json.dumps(json_safe(row), allow_nan=False) + "\n" for row in keep)
        _atomic_write(self.progress_path, text)

    def last_step(self) -> int | None:
        """The step of the last recorded evaluation, or None."""
        rows = self.progress()
        return rows[-1].get("step") if rows else None

    def progress(self) -> list[dict[str, Any]]:
        """Every readable evaluation line, in order; a line that does not parse (a killed writer's
        half-written last line) is skipped with a warning naming the file."""
        if not self.progress_path.is_file():
            return []
        rows, bad = [], 0
        for line in self.progress_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
        if bad:
            warn(f"{self.progress_path}: skipped {bad} unreadable line(s) (a write cut short by a crash or a "
                 "full disk)")
        return rows

    # -- result ------------------------------------------------------------------------------

    def result(self) -> dict[str, Any] | None:
        """``result.json`` (the finished run's metrics); None when missing or unreadable (with a warning)."""
        return _read_mapping(self.result_path, json.loads, "; the run counts as unfinished")

    @property
    def finished(self) -> bool:
        return self.result() is not None

    def write_result(self, record: dict[str, Any]) -> None:
        """Write ``result.json`` atomically (strict JSON)."""
        _atomic_write(self.result_path, json.dumps(json_safe(record), indent=2, default=str) + "\n")

    def update_result(self, **fields: Any) -> None:
        """Add ``fields`` to an existing ``result.json`` (what only the driver knows: wall time, node)."""
        record = self.result()
        if record is not None:
            self.write_result({**record, **fields})

    @property
    def failure_path(self) -> Path:
        return self.path / FAILURE_FILE

    def write_failure(self, record: dict[str, Any]) -> None:
        """Record that the run diverged (``reason``, ``step``); the run is never resumed or exported."""
        _atomic_write(self.failure_path, json.dumps(json_safe(record), indent=2, default=str) + "\n")

    def failure(self) -> dict[str, Any] | None:
        """``failed.json`` when the run diverged, else None."""
        return _read_mapping(self.failure_path, json.loads, "")

    # -- checkpoints -------------------------------------------------------------------------

    def relative(self, path: str | Path | None) -> str | None:
        """``path`` relative to the folder when inside it (as recorded in result.json), else as given."""
        if path is None:
            return None
        try:
            return str(Path(path).resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(path)

    def state_files(self) -> list[Path]:
        """Every checkpoint's state file, newest first (Ray Train's and in-process ones)."""
        found = list(self.path.glob(f"**/checkpoint*/{STATE_FILE}"))  # Ray Train's (train/checkpoint_*)
        found += list(self.path.glob(f"{LOCAL_CHECKPOINTS}/*/{STATE_FILE}"))
        unique = {p.resolve(): p for p in found}
        return sorted(unique.values(), key=lambda p: p.stat().st_mtime, reverse=True)

    def final_state(self) -> Path | None:
        """The state file of the checkpoint the finished run reported last, else the newest one."""
        record = self.result() or {}
        ckpt = record.get("checkpoint")
        if ckpt:
            path = Path(ckpt) if Path(ckpt).is_absolute() else self.path / ckpt
            if (path / STATE_FILE).is_file():
                return path / STATE_FILE
        files = self.state_files()
        return files[0] if files else None

    # -- what the folder holds ---------------------------------------------------------------

    def status(self, resolved: dict[str, Any]) -> tuple[str, str | None]:
        """``(kind, difference)`` of this folder for a run of the raw resolved config ``resolved``:
        ``new`` (missing or empty), ``finished`` (has result.json), ``failed`` (diverged; the
        difference says where and why), ``resume`` (an unfinished run of the same config) or
        ``different`` (another config; ``difference`` names the first key)."""
        if not self.path.exists() or not any(self.path.iterdir()):
            return "new", None
        if self.result_path.exists():
            return "finished", None
        failure = self.failure()
        if failure is not None:
            return "failed", f"at step {failure.get('step')}: {failure.get('reason')}"
        old = self.config_raw()
        diff = first_difference(old, resolved) if old is not None else f"no readable {CONFIG_FILE}"
        return ("resume", None) if diff is None else ("different", diff)
