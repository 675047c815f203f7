"""Datasets, semi-supervised splits and on-device augmentation.

Each dataset family is one module that registers itself in :data:`raykd.registry.DATASETS`; the
registry finds the modules by package scan on its first lookup.
"""

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
