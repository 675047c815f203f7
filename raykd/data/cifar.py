"""CIFAR-10 and CIFAR-100: 60,000 colour 32×32 images (50,000 train, 10,000 test).

Both read torchvision's on-disk layout (the extracted ``cifar-10-python.tar.gz`` /
``cifar-100-python.tar.gz``) under ``data.root``:

* ``cifar10``: ``data.root/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}``;
* ``cifar100``: ``data.root/cifar-100-python/{train, test}`` (the 100 fine labels).

``data.root`` may also be the ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself.
The batches are Python pickles (a dict with ``b"data"``: uint8 ``[N, 3072]``, channel-major rows,
and ``b"labels"`` or ``b"fine_labels"``).  Unpickling runs code chosen by whoever wrote the file:
these are the user's own local files, read as the dataset's authors distribute them; never point
``data.root`` at pickles from an untrusted source.  ``hflip=True``; mean/std are the standard
constants of each training set.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from raykd.data._files import bad_file, check_count, find_files, missing, require_root, to_images, to_labels
from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle

CIFAR10_LAYOUT = "cifar-10-batches-py/ (torchvision's layout: data_batch_1..5 and test_batch)"
CIFAR100_LAYOUT = "cifar-100-python/ (torchvision's layout: train and test)"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@DATASETS.register("cifar10")
def load_cifar10(root: str | None) -> DatasetBundle:
    """Load CIFAR-10 (10 classes) from ``root/cifar-10-batches-py/``.

    Returns:
        train (50,000) and test (10,000), uint8 ``[N, 3, 32, 32]``.  Cached per resolved root and
        shared: treat the tensors as read-only.

    Raises:
        ConfigError: on ``data.root`` when it is unset, or the files are missing or malformed.
    """
    return _load_cifar10(require_root("cifar10", root, CIFAR10_LAYOUT))


@DATASETS.register("cifar100")
def load_cifar100(root: str | None) -> DatasetBundle:
    """Load CIFAR-100 (100 fine classes) from ``root/cifar-100-python/``.

    Returns:
        train (50,000) and test (10,000), uint8 ``[N, 3, 32, 32]``.  Cached per resolved root and
        shared: treat the tensors as read-only.

    Raises:
        ConfigError: on ``data.root`` when it is unset, or the files are missing or malformed.
    """
    return _load_cifar100(require_root("cifar100", root, CIFAR100_LAYOUT))


@functools.lru_cache(maxsize=4)
def _load_cifar10(root: Path) -> DatasetBundle:
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    paths = find_files([root / "cifar-10-batches-py", root], [*train_names, "test_batch"])
    if paths is None:
        raise missing("cifar10", root, CIFAR10_LAYOUT)
    train = _read_batches([paths[n] for n in train_names], b"labels", 10)
    test = _read_batches([paths["test_batch"]], b"labels", 10)
    return DatasetBundle(train, test, num_classes=10, hflip=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)


@functools.lru_cache(maxsize=4)
def _load_cifar100(root: Path) -> DatasetBundle:
    paths = find_files([root / "cifar-100-python", root], ["train", "test"])
    if paths is None:
        raise missing("cifar100", root, CIFAR100_LAYOUT)
    train = _read_batches([paths["train"]], b"fine_labels", 100)
    test = _read_batches([paths["test"]], b"fine_labels", 100)
    return DatasetBundle(train, test, num_classes=100, hflip=True, mean=CIFAR100_MEAN, std=CIFAR100_STD)


def _read_batches(paths: list[Path], label_key: bytes, num_classes: int) -> ArrayDataset:
    """Read and concatenate pickled CIFAR batches."""
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")  # the user's local dataset file (see module doc)
            except Exception as e:  # any unpickling failure means a bad file
                raise bad_file(path, f"not a CIFAR pickle ({type(e).__name__}: {e})") from None
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise bad_file(path, f"not a CIFAR batch (needs keys b'data' and {label_key!r})")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise bad_file(path, f"expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(to_labels(np.asarray(batch[label_key]), num_classes, path))
        check_count(path, images[-1], labels[-1])
    return ArrayDataset(to_images(np.concatenate(images)), torch.cat(labels))
