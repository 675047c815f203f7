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


def raykd_command() -> str:
    """How to call raykd again from this shell: ``raykd`` when it is on PATH, else the path that was
    used (e.g. ``.venv/bin/raykd``), so printed hints can be pasted as they are."""
    used = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "raykd" else None
    on_path = shutil.which("raykd")
    if used is None or (on_path and os.path.realpath(on_path) == os.path.realpath(used)):
        return "raykd"
    return os.path.relpath(used) if not os.path.isabs(used) else used
