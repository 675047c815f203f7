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

**Open-set data** (``data.open_set``, :func:`open_set_data`): ``unseen_classes`` are removed from
the labeled, validation and test sets and stay in the unlabeled pool; the remaining classes are
renumbered 0..C'-1 in their original order (``SSLData.classes`` maps a model output back to the
original class) and the model has C' outputs.  ``extra_unlabeled`` appends another image collection
to the pool: an ImageFolder (``root/<class>/<images>``, :mod:`raykd.data.imagefolder`) or the
training images of another registered dataset, fitted to the labeled dataset's channels and size.
Both kinds of open-set sample carry the hidden label :data:`UNSEEN` (-2) in the pool, so diagnostics
tell them apart from seen-class samples (hidden label >= 0) and from samples of unknown class (-1,
such as STL-10's unlabeled split).  ``unseen_fraction`` subsamples the pool (seeded by ``data.seed``)
so that open-set samples make up that fraction of it: it drops open-set samples when there are more
than the fraction asks for and seen-class samples otherwise; 0 removes every open-set sample (the
closed-set control with the same labeled and test data) and 1 keeps only open-set samples (with
``extra_unlabeled`` this is the SRD paper's protocol: the pool is the extra collection alone).
Samples of unknown class are always kept and counted on neither side.

Memory: when a split selects the whole training set in order, the dataset shares the loader's
tensors instead of copying them; otherwise indexing copies the selected samples.  With STL-10's
unlabeled split, building the unlabeled pool reads the memory-mapped ``unlabeled_X.bin`` once and
holds the pool in RAM (about 2.8 GB): a single tensor is what the training loop and the contract of
:class:`ArrayDataset` expect.  So that the processes of one node (DDP workers, trials) hold that
copy once and not once each, :func:`prepare_data` keeps the built datasets of the larger families in
a memory-mapped cache on local disk, ``$RAYKD_CACHE/data/`` (:mod:`raykd.data.shared`): the first
process builds and writes them, every process maps them, and a batch gathers its rows from the map.
All tensors are shared with the loader's cache or the node's map where possible: treat them as
read-only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle
from raykd.errors import ConfigError

if TYPE_CHECKING:
    from raykd.config import OpenSetConfig

#: hidden label of an open-set unlabeled sample (an unseen class or the extra_unlabeled pool)
UNSEEN = -2


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
        classes: with ``open_set.unseen_classes``, the original class of each model output
            (``classes[k]`` is output ``k``); None when the classes are the dataset's own.
    """

    labeled: ArrayDataset
    unlabeled: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    hflip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[int, ...] | None = None

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
    name: str,
    root: str | None,
    labels_per_class: int | None,
    val_per_class: int = 0,
    seed: int = 0,
    open_set: OpenSetConfig | None = None,
) -> SSLData:
    """Load dataset ``name`` and split it for semi-supervised training.

    Args:
        name: a registered dataset name (``data.name``).
        root: the dataset folder (``data.root``); None means the family's default.
        labels_per_class: labeled samples per class, or None for all.
        val_per_class: held-out validation samples per class.
        seed: the split's seed (``data.seed``).
        open_set: ``data.open_set`` (unseen classes, an extra unlabeled pool), or None.

    Returns:
        The run's labeled, unlabeled, validation and test sets.
    """
    from raykd.data.shared import cache_key, shared_data

    key = cache_key(name, root, labels_per_class, val_per_class, seed, open_set)
    if key is None:
        return _prepare(name, root, labels_per_class, val_per_class, seed, open_set)
    return shared_data(key, name, lambda: _prepare(name, root, labels_per_class, val_per_class, seed, open_set))


def _prepare(
    name: str,
    root: str | None,
    labels_per_class: int | None,
    val_per_class: int,
    seed: int,
    open_set: OpenSetConfig | None,
) -> SSLData:
    """:func:`prepare_data` without the node's shared cache."""
    bundle = load_dataset(name, root)
    if open_set is not None:
        return open_set_data(bundle, open_set, labels_per_class, val_per_class, seed)
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
    return prepare_data(d.name, d.root, d.labels_per_class, d.val_per_class, d.seed, open_set=d.open_set)


# --------------------------------------------------------------------------------------------
# open-set semi-supervised data (data.open_set)

_FIELD = "data.open_set"


def open_set_data(
    bundle: DatasetBundle,
    open_set: OpenSetConfig,
    labels_per_class: int | None,
    val_per_class: int = 0,
    seed: int = 0,
) -> SSLData:
    """Split ``bundle`` with ``open_set`` applied (see the module docstring).

    Raises:
        ConfigError: on ``data.open_set.*`` for classes the dataset does not have, too few seen
            classes, an unreadable extra pool, or an empty unlabeled pool.
    """
    unseen = sorted(set(open_set.unseen_classes))
    bad = [c for c in unseen if not 0 <= c < bundle.num_classes]
    if bad:
        raise ConfigError(f"{_FIELD}.unseen_classes", f"no class {bad[0]}: the dataset has classes "
                          f"0..{bundle.num_classes - 1}")  # fmt: skip
    seen = [c for c in range(bundle.num_classes) if c not in unseen]
    if len(seen) < 2:
        raise ConfigError(f"{_FIELD}.unseen_classes", f"leaves {len(seen)} seen class(es); keep at least 2")
    lut = torch.full((bundle.num_classes,), UNSEEN, dtype=torch.int64)
    lut[seen] = torch.arange(len(seen))

    def relabel(labels: torch.Tensor) -> torch.Tensor:
        known = labels >= 0
        out = labels.clone()
        out[known] = lut[labels[known]]
        return out

    train_labels = relabel(bundle.train.labels)
    split = ssl_split(train_labels, len(seen), labels_per_class, val_per_class, seed)
    test_keep = torch.nonzero(relabel(bundle.test.labels) >= 0).flatten()
    test = _take(bundle.test, test_keep)
    test = ArrayDataset(test.images, relabel(test.labels))

    # the pool: train[unlabeled] (seen or UNSEEN), the dataset's own extra images (-1), the open-set extra pool
    pool_labels = [train_labels[split.unlabeled]]
    extra = bundle.extra_unlabeled if bundle.extra_unlabeled is not None and len(bundle.extra_unlabeled) else None
    if extra is not None:
        pool_labels.append(extra.labels)
    outside = None
    if open_set.extra_unlabeled is not None:
        outside = extra_pool(open_set.extra_unlabeled.name, open_set.extra_unlabeled.root, bundle.image_shape)
        pool_labels.append(torch.full((len(outside),), UNSEEN, dtype=torch.int64))
    labels = torch.cat(pool_labels)
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    if open_set.unseen_fraction is not None:
        keep = subsample_pool(labels, open_set.unseen_fraction, seed)
    if not keep.any():
        raise ConfigError(f"{_FIELD}.unseen_fraction", "leaves the unlabeled pool empty")

    n_train = split.unlabeled.numel()
    n_extra = len(extra) if extra is not None else 0
    parts = [_take(bundle.train, split.unlabeled[keep[:n_train]]).images]
    if extra is not None:
        parts.append(extra.images[torch.nonzero(keep[n_train : n_train + n_extra]).flatten()])
    if outside is not None:
        parts.append(outside.images[torch.nonzero(keep[n_train + n_extra :]).flatten()])
    unlabeled = ArrayDataset(torch.cat(parts) if len(parts) > 1 else parts[0], labels[keep].contiguous())

    labeled = _take(bundle.train, split.labeled)
    val = _take(bundle.train, split.val) if split.val.numel() else None
    return SSLData(
        labeled=ArrayDataset(labeled.images, train_labels[split.labeled]),
        unlabeled=unlabeled,
        val=ArrayDataset(val.images, train_labels[split.val]) if val is not None else None,
        test=test,
        num_classes=len(seen),
        hflip=bundle.hflip,
        mean=tuple(bundle.mean),
        std=tuple(bundle.std),
        classes=tuple(seen) if unseen else None,
    )


def subsample_pool(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Which pool samples to keep so that open-set samples (label :data:`UNSEEN`) make up ``fraction``
    of the seen + open-set samples; the larger side is subsampled at random (seeded), samples of
    unknown class (-1) are always kept.  Returns a bool mask over ``labels``."""
    is_seen, is_unseen = labels >= 0, labels == UNSEEN
    n_seen, n_unseen = int(is_seen.sum()), int(is_unseen.sum())
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    if fraction >= 1.0:
        want_seen, want_unseen = 0, n_unseen
    elif fraction <= 0.0:
        want_seen, want_unseen = n_seen, 0
    elif fraction / (1.0 - fraction) * n_seen <= n_unseen:
        want_seen, want_unseen = n_seen, round(fraction / (1.0 - fraction) * n_seen)
    else:
        want_seen, want_unseen = round(n_unseen * (1.0 - fraction) / fraction), n_unseen
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)  # its own stream: never moves the SSL split
    for mask, want in ((is_seen, want_seen), (is_unseen, want_unseen)):
        members = torch.nonzero(mask).flatten()
        if want < members.numel():
            keep[members[torch.randperm(members.numel(), generator=gen)[want:]]] = False
    return keep


@functools.lru_cache(maxsize=2)
def extra_pool(name: str, root: str | None, image_shape: tuple[int, int, int]) -> ArrayDataset:
    """``data.open_set.extra_unlabeled``: an ImageFolder or a registered dataset's training images (and
    its own unlabeled images, if any), fitted to ``image_shape`` = the labeled dataset's ``(C, H, W)``.
    Cached per arguments; the labels are the collection's own (folder index, or -1) and are not used."""
    from raykd.data.imagefolder import fit_images, load_imagefolder

    field = f"{_FIELD}.extra_unlabeled.root"
    c, h, _ = image_shape
    if name == "imagefolder":
        if root is None:
            raise ConfigError(field, "imagefolder needs a root: a folder laid out as root/<class>/<images>")
        return load_imagefolder(root, c, h, field=field)
    try:
        other = load_dataset(name, root)
    except ConfigError as e:
        raise ConfigError(field if e.field == "data.root" else e.field, e.message) from None
    images = [other.train.images]
    if other.extra_unlabeled is not None and len(other.extra_unlabeled):
        images.append(other.extra_unlabeled.images)
    fitted = torch.cat([fit_images(x, c, h) for x in images])
    return ArrayDataset(fitted, torch.full((fitted.shape[0],), -1, dtype=torch.int64))
