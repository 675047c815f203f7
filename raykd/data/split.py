"""Semi-supervised splits, and the datasets one training run sees.

:func:`ssl_split` draws a class-balanced split of a training set: for each class (in class order) it
permutes that class's samples with a :class:`torch.Generator` seeded by ``seed``, takes the first
``val_per_class`` as held-out validation and the next ``labels_per_class`` as labeled.  Every
non-validation sample is unlabeled, labeled ones included (the FixMatch protocol).  The split
depends only on the labels and ``seed`` (never on the global RNG), the validation set does not depend
on ``labels_per_class``, and for a fixed seed a smaller labeled set is a subset of a larger one.
Index tensors are sorted ascending.  Samples whose label is outside ``[0, num_classes)`` (such as
-1) are never labeled nor validation, only unlabeled.

:func:`prepare_data` loads a dataset and applies the split, giving :class:`SSLData` with four
datasets: ``labeled``, ``unlabeled``, ``val`` (or None) and ``test``.

**Every sample carries its index.**  The index of a sample is its position in the SSLData dataset it
belongs to: ``data.unlabeled.images[i]`` is unlabeled sample ``i``, and so on for ``labeled``,
``val`` and ``test``.  The training loop yields these positions as ``idx`` with every batch, and
methods key per-sample state (pseudo-labels, cluster assignments, ...) by the unlabeled position,
which is stable for a given dataset, root, split and seed.  The unlabeled pool is
``train[split.unlabeled]`` (in ascending train order) followed by the dataset's
``extra_unlabeled`` (STL-10's 100,000 unlabeled images), whose hidden labels are -1.

Memory: when a split selects the whole training set in order, the dataset shares the loader's
tensors instead of copying them; otherwise indexing copies the selected samples.  With STL-10's
unlabeled split, building the unlabeled pool reads the memory-mapped ``unlabeled_X.bin`` once and
holds the pool in RAM (about 2.8 GB): a single tensor is what the training loop and the contract of
:class:`ArrayDataset` expect.  All tensors are shared with the loader's cache where possible: treat
them as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle
from raykd.errors import ConfigError


@dataclass
class SSLSplit:
    """Indices into a training set.

    Attributes:
        labeled: int64 indices of the labeled samples.
        unlabeled: int64 indices of the unlabeled samples; includes the labeled ones (FixMatch
            protocol) and excludes ``val``.
        val: int64 indices of the held-out validation samples, never trained on (may be empty).
    """

    labeled: torch.Tensor
    unlabeled: torch.Tensor
    val: torch.Tensor


def ssl_split(
    labels: torch.Tensor,
    num_classes: int,
    labels_per_class: int | None,
    val_per_class: int = 0,
    seed: int = 0,
) -> SSLSplit:
    """Draw a class-balanced, seeded SSL split (see the module docstring for the procedure).

    Args:
        labels: int64 ``[N]`` training labels.
        num_classes: number of classes; every class must have enough samples.
        labels_per_class: labeled samples per class, or None to label every non-validation sample.
        val_per_class: held-out validation samples per class, drawn first.
        seed: the split's seed.

    Returns:
        The split, each index tensor sorted ascending.

    Raises:
        ConfigError: on ``data.labels_per_class`` / ``data.val_per_class`` when a value is invalid
            or a class has too few samples.
    """
    if labels_per_class is not None and labels_per_class < 1:
        message = f"must be at least 1 (or null for all), got {labels_per_class}"
        raise ConfigError("data.labels_per_class", message)
    if val_per_class < 0:
        raise ConfigError("data.val_per_class", f"must be 0 or more, got {val_per_class}")
    labels = torch.as_tensor(labels).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    need = val_per_class + (labels_per_class or 1)
    is_val = torch.zeros(labels.shape[0], dtype=torch.bool)
    is_labeled = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < need:
            field = "data.labels_per_class" if labels_per_class is not None else "data.val_per_class"
            asked = (
                f"labels_per_class + val_per_class = {need}"
                if labels_per_class is not None
                else f"val_per_class = {val_per_class} leaves no labeled sample"
            )
            have = f"class {c} has only {members.numel()} training samples"
            raise ConfigError(field, f"{have} but {asked}; lower it")
        members = members[torch.randperm(members.numel(), generator=gen)]
        is_val[members[:val_per_class]] = True
        end = None if labels_per_class is None else val_per_class + labels_per_class
        is_labeled[members[val_per_class:end]] = True
    return SSLSplit(
        labeled=torch.nonzero(is_labeled).flatten(),
        unlabeled=torch.nonzero(~is_val).flatten(),
        val=torch.nonzero(is_val).flatten(),
    )


@dataclass
class SSLData:
    """The datasets one training run sees.  Positions are sample indices (see the module docstring).

    Attributes:
        labeled: labeled images with their labels.
        unlabeled: the unlabeled pool with hidden true labels (-1 where unknown); the labels are for
            diagnostics such as pseudo-label accuracy only, never for training.
        val: held-out validation set, or None when ``val_per_class`` is 0.
        test: the test set.
        num_classes, hflip, mean, std: as in :class:`DatasetBundle`.
    """

    labeled: ArrayDataset
    unlabeled: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.test.images.shape[1:]
        return int(c), int(h), int(w)

    @classmethod
    def from_split(cls, bundle: DatasetBundle, split: SSLSplit) -> SSLData:
        """Apply ``split`` (indices into ``bundle.train``) to ``bundle``."""
        unlabeled = _take(bundle.train, split.unlabeled)
        extra = bundle.extra_unlabeled
        if extra is not None and len(extra):
            unlabeled = ArrayDataset(
                torch.cat([unlabeled.images, extra.images]), torch.cat([unlabeled.labels, extra.labels])
            )
        return cls(
            labeled=_take(bundle.train, split.labeled),
            unlabeled=unlabeled,
            val=_take(bundle.train, split.val) if split.val.numel() else None,
            test=bundle.test,
            num_classes=bundle.num_classes,
            hflip=bundle.hflip,
            mean=tuple(bundle.mean),
            std=tuple(bundle.std),
        )


def load_dataset(name: str, root: str | None) -> DatasetBundle:
    """Load the dataset registered as ``name`` (cached per name and root).

    Raises:
        ConfigError: on ``data.name`` for an unknown name, on ``data.root`` for missing files.
    """
    return DATASETS.get(name)(root)


def prepare_data(
    name: str, root: str | None, labels_per_class: int | None, val_per_class: int = 0, seed: int = 0
) -> SSLData:
    """Load dataset ``name`` and split it for semi-supervised training.

    Args:
        name: a registered dataset name (``data.name``).
        root: the dataset folder (``data.root``); None means the family's default.
        labels_per_class: labeled samples per class, or None for all.
        val_per_class: held-out validation samples per class.
        seed: the split's seed (``data.seed``).

    Returns:
        The run's labeled, unlabeled, validation and test sets.
    """
    bundle = load_dataset(name, root)
    split = ssl_split(bundle.train.labels, bundle.num_classes, labels_per_class, val_per_class, seed)
    return SSLData.from_split(bundle, split)


def _take(dataset: ArrayDataset, index: torch.Tensor) -> ArrayDataset:
    """The samples at ``index``; shares ``dataset`` itself when ``index`` is every sample in order."""
    if index.numel() == len(dataset) and torch.equal(index, torch.arange(len(dataset))):
        return dataset
    return ArrayDataset(dataset.images[index].contiguous(), dataset.labels[index].contiguous())


def data_of(run) -> SSLData:
    """The :class:`SSLData` of a run config's ``data`` section (cached loaders).

    Also the pre-flight check before Ray starts: a missing folder raises ConfigError on data.root.
    """
    d = run.data
    return prepare_data(d.name, d.root, d.labels_per_class, d.val_per_class, d.seed)
