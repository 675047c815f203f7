"""Errors a user can fix.  The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


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
