"""Dataset readers (on tiny fixtures in the exact on-disk formats) and SSL splits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from raykd.data import DATASETS, ArrayDataset, SSLData, load_dataset, prepare_data, ssl_split
from raykd.data.digits import fixed_test_mask
from raykd.data.fashion_mnist import read_idx
from raykd.errors import ConfigError

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def make_images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random uint8 ``[N, C, H, W]``; image 0 is black but for a white top-right pixel in channel 0."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 0, w - 1] = 255
    return images


def make_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1).permutation(np.arange(n) % num_classes).astype(np.int64)


def assert_read_back(dataset: ArrayDataset, images: np.ndarray, labels: np.ndarray) -> None:
    """Same shape, dtypes, pixels (orientation included) and labels as written."""
    assert dataset.images.dtype == torch.uint8 and dataset.labels.dtype == torch.int64
    assert tuple(dataset.images.shape) == images.shape
    assert dataset.images.is_contiguous()
    assert int(dataset.images[0, 0, 0, -1]) == 255 and int(dataset.images[0, 0, 0, 0]) == 0
    assert torch.equal(dataset.images, torch.from_numpy(images))
    assert torch.equal(dataset.labels, torch.from_numpy(labels))


def assert_root_error(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    err = excinfo.value
    assert err.field == "data.root"
    assert "\n" not in err.message and "never downloads" in err.message
    for needle in needles:
        assert needle in err.message


# ----------------------------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "fashion_mnist", "stl10", "svhn"]
    with pytest.raises(ConfigError) as excinfo:
        load_dataset("mnist", None)
    assert excinfo.value.field == "data.name"


# ------------------------------------------------------------------------------------------------- digits


def test_digits() -> None:
    bundle = load_dataset("digits", None)
    assert bundle.image_shape == (1, 8, 8) and bundle.num_classes == 10 and bundle.hflip is False
    assert len(bundle.train) + len(bundle.test) == 1797
    assert bundle.train.images.dtype == torch.uint8 and int(bundle.train.images.max()) == 255
    assert set(bundle.test.labels.tolist()) == set(range(10))
    train_counts = torch.bincount(bundle.train.labels, minlength=10)
    test_counts = torch.bincount(bundle.test.labels, minlength=10)
    fractions = test_counts / (train_counts + test_counts)
    assert bool(((fractions - 0.3).abs() < 0.01).all())
    from sklearn.datasets import load_digits

    raw = load_digits()
    test_mask = fixed_test_mask(torch.from_numpy(raw.target.astype(np.int64)))
    first_test = int(torch.nonzero(test_mask)[0])
    expected = np.rint(raw.images[first_test] * 255 / 16).astype(np.uint8)
    assert torch.equal(bundle.test.images[0, 0], torch.from_numpy(expected))
    assert load_dataset("digits", None) is bundle  # cached


def test_digits_test_split_is_fixed() -> None:
    labels = load_dataset("digits", None).train.labels  # any labels will do
    torch.manual_seed(123)
    mask = fixed_test_mask(labels)
    torch.manual_seed(456)
    assert torch.equal(mask, fixed_test_mask(labels))
    a = prepare_data("digits", None, labels_per_class=5, val_per_class=2, seed=0)
    b = prepare_data("digits", None, labels_per_class=5, val_per_class=2, seed=1)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.labeled.images, b.labeled.images)


# ------------------------------------------------------------------------------------------ fashion_mnist


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, gzipped: bool, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": make_images(12, 1, 28, 28, seed)[:, 0],
        "train-labels-idx1-ubyte": make_labels(12, 10, seed),
        "t10k-images-idx3-ubyte": make_images(5, 1, 28, 28, seed + 7)[:, 0],
        "t10k-labels-idx1-ubyte": make_labels(5, 10, seed + 7),
    }
    for name, array in arrays.items():
        if gzipped:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))
    return arrays


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("torchvision_layout", [True, False])
def test_fashion_mnist(tmp_path: Path, gzipped: bool, torchvision_layout: bool) -> None:
    folder = tmp_path / "FashionMNIST" / "raw" if torchvision_layout else tmp_path
    arrays = write_fashion(folder, gzipped)
    bundle = load_dataset("fashion_mnist", str(tmp_path))
    assert bundle.hflip is True and bundle.num_classes == 10 and bundle.image_shape == (1, 28, 28)
    for dataset, prefix in ((bundle.train, "train"), (bundle.test, "t10k")):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        assert_read_back(dataset, images[:, None], labels)
    pixels = bundle.train.images.double() / 255
    assert bundle.mean[0] == pytest.approx(float(pixels.mean()))
    assert bundle.std[0] == pytest.approx(float(pixels.std(unbiased=False)))
    assert load_dataset("fashion_mnist", str(tmp_path)) is bundle  # cached


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    truncated = tmp_path / "short"
    truncated.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    for path in (bad_magic, truncated):
        with pytest.raises(ConfigError) as excinfo:
            read_idx(path)
        assert excinfo.value.field == "data.root" and str(path) in excinfo.value.message
    wide = tmp_path / "wide"
    wide.write_bytes(b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">ii", 258, -3))
    assert read_idx(wide).tolist() == [258, -3]


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    for root in (tmp_path / "nope", tmp_path):
        with pytest.raises(ConfigError) as excinfo:
            load_dataset("fashion_mnist", str(root))
        assert_root_error(excinfo, "apt-get install dataset-fashion-mnist", str(root))


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_files() -> None:
    bundle = load_dataset("fashion_mnist", None)
    assert tuple(bundle.train.images.shape) == (60000, 1, 28, 28)
    assert tuple(bundle.test.images.shape) == (10000, 1, 28, 28)
    assert torch.bincount(bundle.train.labels).tolist() == [6000] * 10
    assert bundle.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert bundle.std[0] == pytest.approx(0.3530, abs=1e-3)


# ------------------------------------------------------------------------------------------------- cifar


def write_cifar(root: Path, name: str, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pickled batches with the keys and dtypes of the real files; returns split → (images, labels)."""
    num_classes, folder, files, label_key = {
        "cifar10": (10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"),
        "cifar100": (100, "cifar-100-python", ["train"], b"fine_labels"),
    }[name]
    (root / folder).mkdir(parents=True)
    test_file = "test_batch" if name == "cifar10" else "test"
    train_images = make_images(10 * len(files) * (2 if name == "cifar10" else 1), 3, 32, 32, seed)
    train_labels = make_labels(len(train_images), num_classes, seed)
    test_images, test_labels = make_images(7, 3, 32, 32, seed + 3), make_labels(7, num_classes, seed + 3)
    parts = len(files)
    chunks = zip(np.array_split(train_images, parts), np.array_split(train_labels, parts), strict=True)
    for file, (images, labels) in [*zip(files, chunks, strict=True), (test_file, (test_images, test_labels))]:
        batch = {
            b"batch_label": file.encode(),
            b"data": images.reshape(len(images), 3072),
            label_key: [int(v) for v in labels],
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
        with open(root / folder / file, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return {"train": (train_images, train_labels), "test": (test_images, test_labels)}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(tmp_path: Path, name: str) -> None:
    written = write_cifar(tmp_path, name)
    bundle = load_dataset(name, str(tmp_path))
    assert bundle.num_classes == (10 if name == "cifar10" else 100)
    assert bundle.hflip is True and bundle.image_shape == (3, 32, 32) and len(bundle.mean) == 3
    assert_read_back(bundle.train, *written["train"])
    assert_read_back(bundle.test, *written["test"])


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError) as excinfo:
        load_dataset("cifar10", str(tmp_path))
    assert_root_error(excinfo, "cifar-10-batches-py")


# -------------------------------------------------------------------------------------------------- svhn


def write_svhn_mat(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """As in the real file: X uint8 [32, 32, 3, N], y uint8 [N, 1] with 10 standing for the digit 0."""
    y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
    scipy.io.savemat(path, {"X": np.ascontiguousarray(images.transpose(2, 3, 1, 0)), "y": y})


def test_svhn(tmp_path: Path) -> None:
    train = make_images(15, 3, 32, 32), make_labels(15, 10)
    test = make_images(6, 3, 32, 32, seed=5), make_labels(6, 10, seed=5)
    write_svhn_mat(tmp_path / "train_32x32.mat", *train)
    write_svhn_mat(tmp_path / "test_32x32.mat", *test)
    bundle = load_dataset("svhn", str(tmp_path))
    assert bundle.hflip is False and bundle.num_classes == 10 and bundle.image_shape == (3, 32, 32)
    assert_read_back(bundle.train, *train)  # 10 in y came back as 0
    assert_read_back(bundle.test, *test)
    assert 0 in bundle.train.labels.tolist() and 10 not in bundle.train.labels.tolist()


# ------------------------------------------------------------------------------------------------- stl10


def write_stl_bin(path: Path, images: np.ndarray) -> None:
    """Each image stored column-major, as in the real files: bytes of [3, W, H]."""
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())


def write_stl(root: Path, unlabeled: int | None = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for split, n, seed in (("train", 20, 0), ("test", 10, 1)):
        images, labels = make_images(n, 3, 96, 96, seed), make_labels(n, 10, seed)
        write_stl_bin(folder / f"{split}_X.bin", images)
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        written[split] = images, labels
    if unlabeled:
        images = make_images(unlabeled, 3, 96, 96, seed=2)
        write_stl_bin(folder / "unlabeled_X.bin", images)
        written["unlabeled"] = images, np.full(unlabeled, -1, dtype=np.int64)
    return written


def test_stl10(tmp_path: Path) -> None:
    written = write_stl(tmp_path)
    bundle = load_dataset("stl10", str(tmp_path))
    assert bundle.hflip is True and bundle.num_classes == 10 and bundle.image_shape == (3, 96, 96)
    assert_read_back(bundle.train, *written["train"])  # labels 1..10 came back as 0..9
    assert_read_back(bundle.test, *written["test"])
    extra = bundle.extra_unlabeled
    assert extra is not None and tuple(extra.images.shape) == (4, 3, 96, 96)
    assert torch.equal(extra.images, torch.from_numpy(written["unlabeled"][0]))  # memory-mapped view
    assert extra.labels.tolist() == [-1] * 4


def test_stl10_without_unlabeled(tmp_path: Path) -> None:
    write_stl(tmp_path, unlabeled=None)
    bundle = load_dataset("stl10", str(tmp_path))
    assert bundle.extra_unlabeled is None and len(bundle.train) == 20


# --------------------------------------------------------------------------------------- missing folders


@pytest.mark.parametrize(
    "name, layout",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
        ("stl10", "stl10_binary"),
    ],
)
def test_missing_root(tmp_path: Path, name: str, layout: str) -> None:
    for root in (None, "", str(tmp_path / "nope"), str(tmp_path)):
        with pytest.raises(ConfigError) as excinfo:
            load_dataset(name, root)
        assert_root_error(excinfo, layout)
        if root:
            assert root in excinfo.value.message


# ------------------------------------------------------------------------------------------------- split


def split_labels() -> torch.Tensor:
    counts = [30, 25, 40, 12, 33]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(9))]


def test_ssl_split_invariants() -> None:
    labels = split_labels()
    split = ssl_split(labels, 5, labels_per_class=4, val_per_class=3, seed=0)
    assert torch.bincount(labels[split.labeled], minlength=5).tolist() == [4] * 5
    assert torch.bincount(labels[split.val], minlength=5).tolist() == [3] * 5
    labeled, unlabeled, val = (set(t.tolist()) for t in (split.labeled, split.unlabeled, split.val))
    assert labeled <= unlabeled
    assert not val & (labeled | unlabeled)
    assert val | unlabeled == set(range(len(labels)))
    for t in (split.labeled, split.unlabeled, split.val):
        assert t.dtype == torch.int64 and torch.equal(t, t.sort().values)


def test_ssl_split_determinism() -> None:
    labels = split_labels()
    torch.manual_seed(1)
    a = ssl_split(labels, 5, 4, 3, seed=0)
    torch.manual_seed(2)
    b = ssl_split(labels, 5, 4, 3, seed=0)
    c = ssl_split(labels, 5, 4, 3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=True))
    assert not torch.equal(a.labeled, c.labeled) and not torch.equal(a.val, c.val)
    bigger = ssl_split(labels, 5, 8, 3, seed=0)
    assert torch.equal(bigger.val, a.val) and set(a.labeled.tolist()) <= set(bigger.labeled.tolist())


def test_ssl_split_all_labeled() -> None:
    labels = split_labels()
    split = ssl_split(labels, 5, labels_per_class=None, val_per_class=2, seed=0)
    assert torch.equal(split.labeled, split.unlabeled) and len(split.labeled) == len(labels) - 10
    whole = ssl_split(labels, 5, None)
    assert torch.equal(whole.labeled, torch.arange(len(labels))) and whole.val.numel() == 0


def test_ssl_split_not_enough_samples() -> None:
    with pytest.raises(ConfigError) as excinfo:
        ssl_split(split_labels(), 5, labels_per_class=10, val_per_class=5)
    assert excinfo.value.field == "data.labels_per_class"
    assert "class 3 has only 12 training samples" in excinfo.value.message and "= 15" in excinfo.value.message
    with pytest.raises(ConfigError) as excinfo:
        ssl_split(split_labels(), 5, labels_per_class=None, val_per_class=12)
    assert excinfo.value.field == "data.val_per_class"
    with pytest.raises(ConfigError) as excinfo:
        ssl_split(split_labels(), 5, labels_per_class=0)
    assert excinfo.value.field == "data.labels_per_class"


# ------------------------------------------------------------------------------------------ prepare_data


def test_prepare_data_positions(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    bundle = load_dataset("cifar10", str(tmp_path))
    data = prepare_data("cifar10", str(tmp_path), labels_per_class=3, val_per_class=2, seed=4)
    split = ssl_split(bundle.train.labels, 10, 3, 2, seed=4)
    assert isinstance(data, SSLData) and data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert (len(data.labeled), len(data.unlabeled), len(data.val), len(data.test)) == (30, 80, 20, 7)
    pairs = ((data.labeled, split.labeled), (data.unlabeled, split.unlabeled), (data.val, split.val))
    for dataset, index in pairs:
        assert torch.equal(dataset.images, bundle.train.images[index])
        assert torch.equal(dataset.labels, bundle.train.labels[index])
    assert data.test is bundle.test and data.hflip and data.mean == bundle.mean


def test_prepare_data_no_val_shares_memory() -> None:
    data = prepare_data("digits", None, labels_per_class=None)
    train = load_dataset("digits", None).train
    assert data.val is None
    assert data.unlabeled.images.data_ptr() == train.images.data_ptr() == data.labeled.images.data_ptr()


def test_prepare_data_stl10_extra(tmp_path: Path) -> None:
    written = write_stl(tmp_path, unlabeled=4)
    data = prepare_data("stl10", str(tmp_path), labels_per_class=1, val_per_class=1, seed=0)
    assert (len(data.labeled), len(data.unlabeled), len(data.val)) == (10, 14, 10)
    assert data.unlabeled.labels[-4:].tolist() == [-1] * 4 and bool((data.unlabeled.labels[:10] >= 0).all())
    assert torch.equal(data.unlabeled.images[-4:], torch.from_numpy(written["unlabeled"][0]))
