"""Helpers shared by the dataset readers: finding files, one-line errors, tensor conversion, the
node's cache folder and its build lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from raykd.errors import ConfigError

NEVER_DOWNLOADS = "raykd never downloads"


def cache_folder() -> Path | None:
    """Where raykd keeps decoded image folders and the node's shared data (``$RAYKD_CACHE``, default
    ``~/.cache/raykd``), or None when ``RAYKD_CACHE=off``."""
    value = os.environ.get("RAYKD_CACHE", "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "raykd"


@contextlib.contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive lock ``path.with_suffix(".lock")`` (created, with ``path``'s folder): one
    process of the node builds ``path`` into the cache; the others wait here, then find it built.
    An OSError (a read-only or full cache folder) propagates to the caller, which builds uncached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def require_root(name: str, root: str | os.PathLike | None, layout: str) -> Path:
    """Return ``root`` as an absolute path, or raise if it is not set.

    Args:
        name: the dataset name, for the message.
        root: the configured ``data.root``.
        layout: what the folder must hold, for the message.

    Raises:
        ConfigError: on ``data.root`` when ``root`` is None or empty.
    """
    if root is None or not os.fspath(root).strip():
        message = f"{name} needs data.root: a folder holding {layout}; {NEVER_DOWNLOADS}"
        raise ConfigError("data.root", message)
    return Path(root).expanduser().resolve()


def find_files(
    folders: Sequence[Path], names: Sequence[str], suffixes: Sequence[str] = ("",)
) -> dict[str, Path] | None:
    """Find every one of ``names`` in the first folder that holds them all.

    Args:
        folders: candidate folders, most preferred first.
        names: file names that must all be present in one folder.
        suffixes: accepted endings for each name, most preferred first (``("", ".gz")``).

    Returns:
        name → path for the first complete folder, or None when no folder holds every file.
    """
    for folder in folders:
        found: dict[str, Path] = {}
        for name in names:
            path = next((folder / (name + s) for s in suffixes if (folder / (name + s)).is_file()), None)
            if path is None:
                break
            found[name] = path
        else:
            return found
    return None


def missing(name: str, root: Path, layout: str, hint: str = "") -> ConfigError:
    """The one-line error for a root folder that does not hold the expected files."""
    where = f"data.root {root} does not exist" if not root.is_dir() else f"{root} does not hold {layout}"
    fix = hint or f"put the files there or set data.root to the folder that holds {layout}"
    return ConfigError("data.root", f"{name}: {where}; {fix}; {NEVER_DOWNLOADS}")


def bad_file(path: Path, problem: str) -> ConfigError:
    """The one-line error for a file that is present but not what it should be."""
    return ConfigError("data.root", f"{path}: {problem}; replace it with the original file")


def to_images(array: np.ndarray) -> torch.Tensor:
    """A contiguous uint8 tensor ``[N, C, H, W]`` that owns a copy of ``array``'s data (one copy)."""
    return torch.from_numpy(np.array(array, dtype=np.uint8, order="C", copy=True))


def to_labels(array: np.ndarray, num_classes: int, path: Path, shift: int = 0) -> torch.Tensor:
    """Labels as int64 ``[N]``, with ``shift`` added, checked to lie in ``[0, num_classes)``.

    Raises:
        ConfigError: on ``data.root`` (naming ``path``) when a label is out of range.
    """
    labels = torch.from_numpy(np.asarray(array).astype(np.int64).reshape(-1) + shift)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise bad_file(
            path,
            f"labels span {int(labels.min()) - shift}..{int(labels.max()) - shift}, "
            f"which does not match {num_classes} classes",
        )
    return labels


def check_count(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise if the image and label counts differ."""
    if images.shape[0] != labels.shape[0]:
        raise bad_file(path, f"{images.shape[0]} images but {labels.shape[0]} labels")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, in [0, 1] scale (via a pixel histogram).

    Args:
        images: uint8 ``[N, C, H, W]``.

    Returns:
        ``(mean, std)``, one float per channel.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        p = hist / hist.sum()
        mean = float((p * values).sum())
        means.append(mean)
        stds.append(float((p * (values - mean) ** 2).sum().sqrt()))
    return tuple(means), tuple(stds)
