"""Datasets, semi-supervised splits and on-device augmentation.

Importing this package registers every dataset family (one module each) in :data:`DATASETS`.
"""

from raykd.data import cifar, digits, fashion_mnist, stl10, svhn  # noqa: F401  (registers the families)
from raykd.data.base import DATASETS, ArrayDataset, DatasetBundle
from raykd.data.split import SSLData, SSLSplit, data_of, load_dataset, prepare_data, ssl_split

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetBundle",
    "SSLData",
    "SSLSplit",
    "data_of",
    "load_dataset",
    "prepare_data",
    "ssl_split",
]
