"""SVHN (Street View House Numbers, cropped digits): colour 32×32 images, 10 classes.

Reads torchvision's on-disk layout: ``data.root/{train_32x32.mat, test_32x32.mat}`` (73,257 train and
26,032 test images).  In the .mat files ``X`` is uint8 ``[32, 32, 3, N]`` (row, column, channel,
sample) and ``y`` holds 1..10, where 10 stands for the digit 0; raykd maps 10 → 0 so that a label
is the digit.  The optional ``extra_32x32.mat`` is not used.  ``hflip=False`` (digits are not
mirror-symmetric); mean/std are the standard constants of the training set.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from raykd.data._files import bad_file, check_count, find_files, missing, require_root, to_images, to_labels
from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle

LAYOUT = "train_32x32.mat and test_32x32.mat (torchvision's layout)"
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


@DATASETS.register("svhn")
def load(root: str | None) -> DatasetBundle:
    """Load SVHN from ``root/{train,test}_32x32.mat``.

    Returns:
        train and test, uint8 ``[N, 3, 32, 32]``, labels 0..9 (the digit).  Cached per resolved root
        and shared: treat the tensors as read-only.

    Raises:
        ConfigError: on ``data.root`` when it is unset, or the files are missing or malformed.
    """
    return _load(require_root("svhn", root, LAYOUT))


@functools.lru_cache(maxsize=4)
def _load(root: Path) -> DatasetBundle:
    paths = find_files([root], ["train_32x32.mat", "test_32x32.mat"])
    if paths is None:
        raise missing("svhn", root, LAYOUT)
    train = _read_mat(paths["train_32x32.mat"])
    test = _read_mat(paths["test_32x32.mat"])
    return DatasetBundle(train, test, num_classes=10, hflip=False, mean=SVHN_MEAN, std=SVHN_STD)


def _read_mat(path: Path) -> ArrayDataset:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # any parse failure means a bad file
        raise bad_file(path, f"not a readable .mat file ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat:
        raise bad_file(path, "needs variables X and y")
    x = mat["X"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise bad_file(path, f"expected uint8 X [32, 32, 3, N], got {x.dtype} {x.shape}")
    y = np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    y[y == 10] = 0
    images = to_images(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    labels = to_labels(y, 10, path)
    check_count(path, images, labels)
    return ArrayDataset(images, labels)
