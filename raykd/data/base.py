"""Dataset bundle and the dataset registry.

A dataset family is a function ``load(root: str | None) -> DatasetBundle`` registered with
``@DATASETS.register(name)``.  Loaders read files already on disk (torchvision's on-disk layouts or
an embedded dataset); they never download.  A missing folder or file raises
:class:`raykd.errors.ConfigError` on ``data.root`` with one line that says what to put where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raykd.registry import DATASETS

__all__ = ["DATASETS", "ArrayDataset", "DatasetBundle"]


@dataclass
class ArrayDataset:
    """Images as a uint8 tensor ``[N, C, H, W]`` and int64 labels ``[N]`` (-1 where unknown)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise TypeError(f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DatasetBundle:
    """What a dataset family loads.

    Attributes:
        train: the training set (labeled pool; the SSL split draws labels and validation from it).
        test: the test set.
        num_classes: number of classes.
        hflip: whether horizontal flips are a valid weak augmentation (False for digits, SVHN).
        mean, std: per-channel normalisation constants for images scaled to [0, 1].
        extra_unlabeled: images with no labels that join the unlabeled pool (STL-10's unlabeled
            split), or None.
    """

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra_unlabeled: ArrayDataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)
