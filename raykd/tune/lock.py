"""One driver per study folder: a lock that a crashed driver does not leave stuck.

``raykd study run`` / ``resume`` and ``raykd ablate`` hold an exclusive ``flock`` on
``<folder>/.raykd.lock`` for as long as they run.  The kernel drops it when the process ends, however
it ends (Ctrl-C, SIGKILL, a lost machine), so a later command never finds a stale lock; the file
itself keeps who held it last (pid, host, command, time) for the message a second driver gets.
Readers (``study status``) use the same lock to tell a running trial from an interrupted one.

On a shared folder the lock is only as good as the file system's ``flock`` (local disks and NFSv4
honour it across processes of one machine; across machines it depends on the mount).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from raykd.errors import ConfigError

LOCK_FILE = ".raykd.lock"


class StudyLock:
    """The lock of one study or ablation folder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str | None:
        """Who holds the lock now (``pid 123 on host h since 10:42:01: raykd study run …``), or None
        when nobody does (no folder yet, no lock file, or its holder has ended)."""
        if self._fd is not None or not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._describe()
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _describe(self) -> str:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "another raykd process"
        since = time.strftime("%H:%M:%S", time.localtime(info.get("time", 0)))
        return f"pid {info.get('pid')} on host {info.get('host')} since {since} ({info.get('command')})"

    def acquire(self, what: str) -> None:
        """Take the lock (creating the folder) or raise ConfigError naming the holder.  ``what`` names
        the folder in the message (``study quickstart``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(str(self.path.parent), f"{what} is running already: {self._describe()}; wait for "
                              "it to end (or stop it), then run this again") from None  # fmt: skip
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                "command": " ".join(["raykd", *sys.argv[1:]])[:200]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def check_free(self, what: str) -> None:
        """Raise ConfigError when another process holds the lock (without taking it)."""
        holder = self.holder()
        if holder is not None:
            raise ConfigError(str(self.path.parent), f"{what} is running already: {holder}; wait for it to end "
                              "(or stop it), then run this again")  # fmt: skip
