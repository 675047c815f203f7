"""Fashion-MNIST: 70,000 grey 28×28 images of clothing, 10 classes, read from idx files.

Default root: ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package).
``data.root`` may instead point at a folder holding the four idx files directly or in torchvision's
layout ``FashionMNIST/raw/``.  Files may be gzipped (``.gz``) or not; an uncompressed file wins when
both are present.  ``hflip=True``; mean/std are computed exactly from the training images.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from raykd.data._files import NEVER_DOWNLOADS, bad_file, channel_stats, check_count, find_files, to_labels
from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle
from raykd.errors import ConfigError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
NUM_CLASSES = 10

# idx type byte → big-endian numpy dtype (the idx format, as published with MNIST).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@DATASETS.register("fashion_mnist")
def load(root: str | None = None) -> DatasetBundle:
    """Load Fashion-MNIST.

    Args:
        root: a folder holding the idx files (or ``FashionMNIST/raw/`` with them); None means
            :data:`DEFAULT_ROOT`.

    Returns:
        train (60,000) and test (10,000), uint8 ``[N, 1, 28, 28]``.  The bundle is cached per
        resolved root and shared: treat its tensors as read-only.

    Raises:
        ConfigError: on ``data.root`` when the files are missing or malformed.
    """
    if root is None or not os.fspath(root).strip():
        root = DEFAULT_ROOT
    return _load(Path(root).expanduser().resolve())


@functools.lru_cache(maxsize=4)
def _load(root: Path) -> DatasetBundle:
    paths = find_files([root, root / "FashionMNIST" / "raw"], FILES, suffixes=("", ".gz"))
    if paths is None:
        names = ", ".join(f"{n}[.gz]" for n in FILES)
        where = (
            f"data.root {root} does not exist"
            if not root.is_dir()
            else f"{root} (and its FashionMNIST/raw/) lacks {names}"
        )
        raise ConfigError(
            "data.root",
            f"fashion_mnist: {where};"
            f" run `apt-get install dataset-fashion-mnist` (fills {DEFAULT_ROOT})"
            f" or set data.root to a folder holding those files; {NEVER_DOWNLOADS}",
        )
    train = _read_split(paths["train-images-idx3-ubyte"], paths["train-labels-idx1-ubyte"])
    test = _read_split(paths["t10k-images-idx3-ubyte"], paths["t10k-labels-idx1-ubyte"])
    mean, std = channel_stats(train.images)
    return DatasetBundle(train=train, test=test, num_classes=NUM_CLASSES, hflip=True, mean=mean, std=std)


def _read_split(images_path: Path, labels_path: Path) -> ArrayDataset:
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise bad_file(images_path, f"expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise bad_file(labels_path, f"expected labels [N], got shape {labels.shape}")
    dataset = ArrayDataset(torch.from_numpy(images).unsqueeze(1), to_labels(labels, NUM_CLASSES, labels_path))
    check_count(labels_path, dataset.images, dataset.labels)
    return dataset


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzipped when its name ends in ``.gz``).

    The header is two zero bytes, a type byte (0x08 = uint8, ...), a byte giving the number of
    dimensions, then each dimension as a big-endian uint32; the data follow, big-endian, row-major.

    Args:
        path: the file.

    Returns:
        A writable array of the stored shape, in native byte order.

    Raises:
        ConfigError: on ``data.root`` when the header is not an idx header or the size disagrees.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise bad_file(path, f"cannot read it ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise bad_file(path, "not an idx file (bad magic number)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise bad_file(path, "truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - offset != count * dtype.itemsize:
        size = len(raw) - offset
        raise bad_file(path, f"header says {shape} of {dtype} but the file holds {size} data bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)
