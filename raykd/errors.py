"""Errors a user can fix (the CLI prints them as one line and exits with code 2), and how to quote
the raykd command in hints."""

from __future__ import annotations

import os
import shutil
import sys


class ConfigError(ValueError):
    """Bad user input: a config field, a path or a name.

    Args:
        field: the dotted config field at fault (``"method.threshold"``, ``"data.root"``), or the
            command-line argument (``"--set"``).
        message: what is wrong and how to fix it, without the field name.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DivergedError(RuntimeError):
    """A run stopped because its loss (or a watched metric) became non-finite or exploded.

    The run folder holds ``failed.json`` with the same reason; the run is not resumed or exported.
    """

    def __init__(self, reason: str, step: int | None = None, run_dir: str | None = None):
        self.reason, self.step, self.run_dir = reason, step, run_dir
        at = f" at step {step}" if step is not None else ""
        where = f" (run folder {run_dir})" if run_dir else ""
        super().__init__(f"the run diverged{at}: {reason}{where}")


def raykd_command() -> str:
    """How to call raykd again from this shell: ``raykd`` when it is on PATH, else the path that was
    used (e.g. ``.venv/bin/raykd``), so printed hints can be pasted as they are."""
    used = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "raykd" else None
    on_path = shutil.which("raykd")
    if used is None or (on_path and os.path.realpath(on_path) == os.path.realpath(used)):
        return "raykd"
    return os.path.relpath(used) if not os.path.isabs(used) else used
