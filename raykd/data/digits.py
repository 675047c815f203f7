"""scikit-learn's handwritten digits: 1,797 grey 8×8 images, 10 classes, embedded (no files needed).

The pixel values 0–16 are scaled to uint8 by ``round(v * 255 / 16)``.

The dataset has no official test split, so raykd fixes one: about 30 % of each class
(``round(0.3 * n_class)`` samples, 539 in all) goes to the test set, drawn with a
:class:`torch.Generator` seeded with the constant :data:`TEST_SPLIT_SEED`.  The split never depends
on the user's seeds, so test accuracies are comparable across runs and seeds.  Train and test keep
the order of ``sklearn.datasets.load_digits``.  Horizontal flips are not a valid augmentation for
digits (``hflip=False``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from raykd.data._files import channel_stats
from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle

TEST_FRACTION = 0.3
TEST_SPLIT_SEED = 20_170_316  # a constant: the test split must never follow a user seed
NUM_CLASSES = 10


@DATASETS.register("digits", reads_root=False)
def load(root: str | None = None) -> DatasetBundle:
    """Load the digits dataset.

    Args:
        root: ignored; the data is embedded in scikit-learn.

    Returns:
        train (1,258 samples) and test (539 samples), uint8 ``[N, 1, 8, 8]``, 10 classes.
        The bundle is cached and shared: treat its tensors as read-only.
    """
    return _load()


@functools.lru_cache(maxsize=1)
def _load() -> DatasetBundle:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy(np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1).contiguous()
    labels = torch.from_numpy(raw.target.astype(np.int64))
    test_mask = fixed_test_mask(labels)
    train = ArrayDataset(images[~test_mask].contiguous(), labels[~test_mask].contiguous())
    test = ArrayDataset(images[test_mask].contiguous(), labels[test_mask].contiguous())
    mean, std = channel_stats(train.images)
    return DatasetBundle(train=train, test=test, num_classes=NUM_CLASSES, hflip=False, mean=mean, std=std)


def fixed_test_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the fixed, stratified test samples (about 30 % of each class).

    Args:
        labels: int64 ``[N]``, the labels in ``load_digits`` order.

    Returns:
        bool ``[N]``; True for test samples.  Depends only on ``labels`` and :data:`TEST_SPLIT_SEED`.
    """
    gen = torch.Generator().manual_seed(TEST_SPLIT_SEED)
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in range(NUM_CLASSES):
        members = torch.nonzero(labels == c).flatten()
        n_test = round(TEST_FRACTION * members.numel())
        mask[members[torch.randperm(members.numel(), generator=gen)[:n_test]]] = True
    return mask
