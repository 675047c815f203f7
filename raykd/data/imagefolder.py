"""An ImageFolder-style reader for unlabeled pools, and fitting images to another dataset's shape.

Layout: ``root/<class>/<image files>`` — every sub-folder of ``root`` (in sorted order) is a class and
every image file below it, at any depth, belongs to that class (so Tiny-ImageNet-200's
``train/<wnid>/images/*.JPEG`` reads as is with ``root = .../tiny-imagenet-200/train``).  Image files
are those ending in .png, .jpg, .jpeg, .bmp, .gif, .webp, .ppm, .pgm or .tif(f) (any case); other
files (``*_boxes.txt``) and hidden entries are skipped.  Files are listed in sorted order, so a
sample's position is stable for a given folder.

Images are decoded with Pillow (installed with torchvision), converted to grey ("L") or RGB to match
the labeled dataset's channels, scaled so that the shorter side equals the target size and
center-cropped to a square (Pillow's ``ImageOps.fit`` with bilinear, antialiased resampling), and
returned as one uint8 tensor ``[N, C, size, size]``.  Decoding runs on a few threads (100,000 JPEGs
of 64 px take about 20 s on 2 cores), so the result is cached twice: in the process per (root,
channels, size), and on disk as one ``.npy`` per (root, channels, size, every file's path, size and
mtime) under ``$RAYKD_CACHE`` (default ``~/.cache/raykd``), ``imagefolder/``.  The first process on a
node decodes under a file lock and writes the array; the DDP workers and trials after it map the
array (copy-on-write) and have it in about two seconds, most of which is listing the files to check
the key (``benchmarks/imagefolder_cache.py``).  The unlabeled pool built from it is kept once per node
too (:mod:`raykd.data.shared`).  Changing, adding or removing an image changes the key, so a
stale array is never read; delete the folder to reclaim the space.  Set ``RAYKD_CACHE=off`` to
decode every time.

:func:`fit_images` does the same channel conversion, center crop and resize for uint8 tensors (used
when another registered dataset serves as the unlabeled pool).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raykd.data._files import cache_folder, node_lock
from raykd.data.base import ArrayDataset
from raykd.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
#: BT.601 luma weights for RGB → grey
_LUMA = (0.299, 0.587, 0.114)


def list_images(root: Path, field: str = "data.root") -> tuple[list[Path], torch.Tensor, list[str]]:
    """The image files under ``root/<class>/`` (sorted), their class indices and the class names.

    Raises:
        ConfigError: on ``field`` when ``root`` is missing, has no class folders or holds no image.
    """
    if not root.is_dir():
        raise ConfigError(field, f"imagefolder: {root} does not exist; give a folder laid out as root/<class>/<images>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(field, f"imagefolder: {root} has no class sub-folders; lay it out as root/<class>/<images>")
    files: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        files += found
        labels += [c] * len(found)
    if not files:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        raise ConfigError(field, f"imagefolder: no image files ({suffixes}) under the class folders of {root}")
    return files, torch.tensor(labels, dtype=torch.int64), classes


def load_imagefolder(root: str | os.PathLike, channels: int, size: int, field: str = "data.root") -> ArrayDataset:
    """Read ``root/<class>/<images>`` as uint8 ``[N, channels, size, size]`` with the class indices as labels.

    Args:
        root: the folder.
        channels: 1 (grey) or 3 (RGB): the labeled dataset's channels.
        size: the labeled dataset's image size (square).
        field: the config field named in errors.

    Returns:
        The images (cached per resolved root, channels and size; treat as read-only) and their
        class-folder indices.

    Raises:
        ConfigError: on ``field`` for a missing or empty folder or an undecodable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return _load(Path(root).expanduser().resolve(), channels, size, field)


@functools.lru_cache(maxsize=2)
def _load(root: Path, channels: int, size: int, field: str) -> ArrayDataset:
    files, labels, _ = list_images(root, field)
    folder = cache_folder()
    if folder is None:
        return ArrayDataset(_decode(files, channels, size, field), labels)
    stats = [(str(f.relative_to(root)), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    key = json.dumps([str(root), channels, size, stats])
    path = folder / "imagefolder" / f"{root.name}-{channels}x{size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    images = None
    try:
        with node_lock(path):  # one decoder per node; the others wait, then load
            if not path.exists():
                images = _decode(files, channels, size, field)
                tmp = path.with_suffix(".tmp.npy")
                try:
                    np.save(tmp, images.numpy())
                    tmp.replace(path)
                finally:
                    tmp.unlink(missing_ok=True)  # a partial write (full disk) is not left behind
    except OSError as e:  # a read-only or full cache folder: decode without it (once: a decoded array is kept)
        print(f"raykd: not caching {root} in {folder} ({e}); decoding it in every process", flush=True)
        if images is None:
            images = _decode(files, channels, size, field)
    if images is None:  # memory-mapped copy-on-write: nothing is read until the pool is built from it
        images = torch.from_numpy(np.load(path, mmap_mode="c"))
    return ArrayDataset(images, labels)


def _decode(files: list[Path], channels: int, size: int, field: str) -> torch.Tensor:
    """Decode ``files`` with Pillow as uint8 ``[N, channels, size, size]`` on a few threads."""
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow comes with torchvision
        raise ConfigError(field, "imagefolder needs Pillow: pip install pillow") from None
    mode = "L" if channels == 1 else "RGB"

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img = ImageOps.fit(img.convert(mode), (size, size), method=Image.Resampling.BILINEAR)
                return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ConfigError(field, f"imagefolder: cannot read {path} ({e}); remove or replace it") from None

    out = np.empty((len(files), size, size, channels), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, array in enumerate(pool.map(read, files, chunksize=64)):
            out[i] = array
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def fit_images(images: torch.Tensor, channels: int, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` as uint8 ``[N, channels, size, size]``.

    Grey → RGB repeats the channel; RGB → grey takes the BT.601 luma; the largest centred square is
    cropped and resized (bilinear, antialiased) when its side differs from ``size``.  Works in chunks
    so that large (memory-mapped) pools are never converted to float at once.
    """
    n, c, h, w = images.shape
    if c not in (1, 3) or channels not in (1, 3):
        raise ValueError(f"only 1- and 3-channel images are supported, got {c} -> {channels}")
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    if c == channels and side == size and h == w:
        return images.contiguous()
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    luma = torch.tensor(_LUMA).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        x = images[start : start + chunk, :, top : top + side, left : left + side].float()
        if c == 3 and channels == 1:
            x = (x * luma).sum(dim=1, keepdim=True)
        elif c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out
