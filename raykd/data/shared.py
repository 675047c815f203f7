"""One copy of a run's datasets per node: a memory-mapped cache of :class:`SSLData` on local disk.

:func:`raykd.data.split.prepare_data` (and so ``data_of``, which every DDP worker and trial calls)
keeps the images of the four datasets of a run (labeled, unlabeled, val, test) in one folder per
(dataset, root, split, open-set settings) under ``$RAYKD_CACHE/data/`` (default
``~/.cache/raykd/data/``; ``RAYKD_CACHE=off`` turns it off).  The first process on a node builds the
data as before, under a file lock, writes every array as ``.npy`` into a temporary folder and
renames it into place (so a folder that exists is complete), then drops its loaders' in-process
caches.  Every process, that one included, maps the arrays copy-on-write
(``np.load(mmap_mode="c")``): the images are pages of the node's page cache, shared by all of its
processes (counted once in the node's summed proportional set size, not once per process), and a
batch gathers only its rows from the map (``images[idx]`` on the mapped tensor).  Labels are small
and read into memory.  The result is byte-identical to building the data in the process
(``tests/test_shared_data.py``).

The key holds the dataset name, the resolved root with the size and mtime of every file in its first
two levels (and of every file of an ``open_set.extra_unlabeled`` image folder), the split settings,
the open-set settings and a hash of the source of ``raykd/data/*.py``: changing a file or the code
that reads it gives a new folder, so a stale one is never read.  Only the dataset families shipped
in ``raykd/data`` are cached (a plugin's loader may read anything), and only when the files read
total at least :data:`MIN_BYTES` (64 MiB: CIFAR, SVHN, STL-10; not the embedded digits or small
fixtures, which are cheaper to build than to write).  Each distinct split writes its
own folder (STL-10 with its unlabeled split: about 2.9 GB); delete ``$RAYKD_CACHE/data`` to reclaim
the space.  A cache folder that cannot be written (read-only, full) falls back to building the data
in each process, with one line saying so.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from raykd.data._files import cache_folder, node_lock
from raykd.data.base import DATASETS, ArrayDataset

if TYPE_CHECKING:
    from raykd.config import OpenSetConfig
    from raykd.data.split import SSLData

#: bump when the folder layout changes
FORMAT = 1
#: datasets whose files total less than this are built in each process (not worth a disk copy)
MIN_BYTES = 64 << 20
_PARTS = ("labeled", "unlabeled", "val", "test")


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _files(root: str | None, depth: int | None) -> list:
    """(relative path, size, mtime) of the files under ``root`` (``depth`` levels, None = all)."""
    if root is None:
        return []
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        return [str(base), base.is_file()]
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        rel = Path(dirpath).relative_to(base)
        if depth is not None and len(rel.parts) >= depth - 1:
            dirnames[:] = []
        dirnames.sort()
        for name in sorted(filenames):
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            out.append((str(rel / name), st.st_size, st.st_mtime_ns))
    return [str(base), out]


def _size(files: list) -> int:
    return sum(f[1] for f in files[1]) if len(files) == 2 and isinstance(files[1], list) else 0


def cache_key(
    name: str,
    root: str | None,
    labels_per_class: int | None,
    val_per_class: int,
    seed: int,
    open_set: OpenSetConfig | None,
) -> str | None:
    """The cache key of a run's data, or None when the dataset is not cached (a plugin's loader)."""
    if not getattr(DATASETS.get(name), "__module__", "").startswith("raykd.data."):
        return None
    extra = None
    if open_set is not None:
        extra = open_set.model_dump(mode="json")
        e = open_set.extra_unlabeled
        if e is not None:
            if e.name != "imagefolder" and not DATASETS.get(e.name).__module__.startswith("raykd.data."):
                return None
            extra["files"] = _files(e.root, None if e.name == "imagefolder" else 2)
    files = _files(root, 2)
    size = _size(files) + (_size(extra.get("files", [])) if extra is not None else 0)
    if size < MIN_BYTES:
        return None
    parts = [FORMAT, _code_hash(), name, files, labels_per_class, val_per_class, seed, extra]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def shared_data(key: str, name: str, build: Callable[[], SSLData]) -> SSLData:
    """The data under ``key``: mapped from the node's cache, which ``build`` fills on a miss."""
    folder = cache_folder()
    if folder is None:
        return build()
    path = folder / "data" / f"{name}-{key}"
    built = None
    try:
        with node_lock(path):  # one builder per node; the others wait, then map
            if not (path / "meta.json").is_file():
                for stale in path.parent.glob(f".{path.name}-*"):  # a builder killed mid-write
                    shutil.rmtree(stale, ignore_errors=True)
                built = build()
                _write(built, path)
    except OSError as e:
        print(f"raykd: not caching the {name} data in {folder} ({e}); building it in every process",
              file=sys.stderr, flush=True)  # fmt: skip
        return built if built is not None else build()
    if built is not None:  # this process built the data: drop its copies, it maps the shared files too
        del built
        _forget_loaders()
    return _map(path)


def _forget_loaders() -> None:
    """Clear the in-process caches of the dataset loaders (``functools.lru_cache``), so that the
    process that built the shared data does not keep its own copy of the training and test sets."""
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("raykd.data.") or module_name == __name__ or module is None:
            continue
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", "") == module_name:
                value.cache_clear()
    gc.collect()


def _write(data: SSLData, path: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        for part in _PARTS:
            ds = getattr(data, part)
            if ds is None:
                continue
            np.save(tmp / f"{part}_images.npy", np.ascontiguousarray(ds.images.numpy()))
            np.save(tmp / f"{part}_labels.npy", ds.labels.numpy())
        meta = {
            "parts": [p for p in _PARTS if getattr(data, p) is not None],
            "num_classes": data.num_classes,
            "hflip": data.hflip,
            "mean": list(data.mean),
            "std": list(data.std),
            "classes": None if data.classes is None else list(data.classes),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial write (full disk) is not left behind


@functools.lru_cache(maxsize=4)
def _map(path: Path) -> SSLData:
    from raykd.data.split import SSLData

    meta = json.loads((path / "meta.json").read_text())
    sets: dict[str, ArrayDataset | None] = dict.fromkeys(_PARTS)
    for part in meta["parts"]:
        images = torch.from_numpy(np.load(path / f"{part}_images.npy", mmap_mode="c"))
        labels = torch.from_numpy(np.load(path / f"{part}_labels.npy"))
        sets[part] = ArrayDataset(images, labels)
    return SSLData(
        labeled=sets["labeled"],
        unlabeled=sets["unlabeled"],
        val=sets["val"],
        test=sets["test"],
        num_classes=meta["num_classes"],
        hflip=meta["hflip"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        classes=None if meta["classes"] is None else tuple(meta["classes"]),
    )
