"""STL-10: colour 96×96 images, 10 classes, 5,000 train, 8,000 test and 100,000 unlabeled.

Reads torchvision's on-disk layout (the extracted ``stl10_binary.tar.gz``):
``data.root/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin}``
(``data.root`` may also be the ``stl10_binary`` folder itself).  ``*_X.bin`` hold raw uint8 images,
each stored column-major: as ``[3, 96 (column), 96 (row)]``; raykd returns them as
``[N, 3, 96 (row), 96 (column)]``.  ``*_y.bin`` hold uint8 labels 1..10, mapped to 0..9.

``unlabeled_X.bin`` (2.7 GB) becomes ``extra_unlabeled`` with labels -1.  It is memory-mapped
copy-on-write (never written back) and exposed as a transposed *view* of the map, so loading it
reads nothing and its ``images`` tensor is not contiguous; indexing a batch out of it gives a
contiguous copy.  When ``unlabeled_X.bin`` is absent, ``extra_unlabeled`` is None and only the
training images form the unlabeled pool.  The standard 10 folds of 1,000 labels
(``fold_indices.txt``) are not used: labels come from raykd's class-balanced SSL split.
``hflip=True``; mean/std are the standard constants of the training set.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from raykd.data._files import bad_file, check_count, find_files, missing, require_root, to_images, to_labels
from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle

LAYOUT = "stl10_binary/ (torchvision's layout: train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin)"
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
_IMAGE_SHAPE = (3, 96, 96)
_IMAGE_BYTES = 3 * 96 * 96


@DATASETS.register("stl10")
def load(root: str | None) -> DatasetBundle:
    """Load STL-10 from ``root/stl10_binary/``.

    Returns:
        train (5,000) and test (8,000), uint8 ``[N, 3, 96, 96]``, labels 0..9, and
        ``extra_unlabeled`` (100,000 memory-mapped images, labels -1) or None when
        ``unlabeled_X.bin`` is missing.  Cached per resolved root and shared: treat the tensors as
        read-only.

    Raises:
        ConfigError: on ``data.root`` when it is unset, or the files are missing or malformed.
    """
    return _load(require_root("stl10", root, LAYOUT))


@functools.lru_cache(maxsize=4)
def _load(root: Path) -> DatasetBundle:
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    paths = find_files([root / "stl10_binary", root], names)
    if paths is None:
        raise missing("stl10", root, LAYOUT)
    train = _read_labeled(paths["train_X.bin"], paths["train_y.bin"])
    test = _read_labeled(paths["test_X.bin"], paths["test_y.bin"])
    unlabeled_path = paths["train_X.bin"].parent / "unlabeled_X.bin"
    extra = None
    if unlabeled_path.is_file():
        images = _map_images(unlabeled_path)
        extra = ArrayDataset(images, torch.full((images.shape[0],), -1, dtype=torch.int64))
    return DatasetBundle(train, test, num_classes=10, hflip=True, mean=STL10_MEAN, std=STL10_STD, extra_unlabeled=extra)


def _read_labeled(images_path: Path, labels_path: Path) -> ArrayDataset:
    raw = np.fromfile(images_path, dtype=np.uint8)
    if raw.size % _IMAGE_BYTES:
        raise bad_file(images_path, f"size {raw.size} is not a multiple of {_IMAGE_BYTES} (3×96×96)")
    images = to_images(raw.reshape(-1, *_IMAGE_SHAPE).transpose(0, 1, 3, 2))
    labels = to_labels(np.fromfile(labels_path, dtype=np.uint8), 10, labels_path, shift=-1)
    check_count(labels_path, images, labels)
    return ArrayDataset(images, labels)


def _map_images(path: Path) -> torch.Tensor:
    """Memory-map a ``*_X.bin`` file as a (non-contiguous) ``[N, 3, 96, 96]`` view; reads nothing."""
    size = path.stat().st_size
    if size == 0 or size % _IMAGE_BYTES:
        raise bad_file(path, f"size {size} is not a positive multiple of {_IMAGE_BYTES} (3×96×96)")
    mapped = np.memmap(path, dtype=np.uint8, mode="c", shape=(size // _IMAGE_BYTES, *_IMAGE_SHAPE))
    return torch.from_numpy(mapped).transpose(2, 3)
