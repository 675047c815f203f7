"""Tests for the batched weak/strong augmentation (raykd.data.augment)."""

from __future__ import annotations

import time

import pytest
import torch

from raykd.data import augment
from raykd.data.augment import OPS, Augmenter

SHAPES = [(1, 8), (3, 8), (1, 32), (3, 32)]  # (channels, size)


def _images(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)


def _n_unique(y: torch.Tensor) -> int:
    return torch.unique(y.flatten(1), dim=0).shape[0]


def _aug(c: int, **kw) -> Augmenter:
    return Augmenter(**{"hflip": True, "mean": (0.5,) * c, "std": (0.25,) * c, **kw})


@pytest.mark.parametrize("c,size", SHAPES)
@pytest.mark.parametrize("kind", ["weak", "strong"])
@pytest.mark.parametrize("hflip", [True, False])
def test_identical_inputs_differ(kind: str, c: int, size: int, hflip: bool) -> None:
    x = _images(1, c, size).expand(64, c, size, size).contiguous()
    y = getattr(_aug(c, hflip=hflip), kind)(x, torch.Generator().manual_seed(1))
    assert _n_unique(y) >= 8


@pytest.mark.parametrize("c,size", SHAPES)
@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_shape_dtype_range(kind: str, c: int, size: int) -> None:
    aug = _aug(c)
    x = _images(256, c, size)
    fn = getattr(aug, kind)
    y = fn(x, torch.Generator().manual_seed(0), normalize=False)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    z = fn(x.float() / 255, torch.Generator().manual_seed(0))  # float input, normalised output
    assert z.shape == x.shape and z.dtype == torch.float32 and torch.isfinite(z).all()
    torch.testing.assert_close(aug.denormalize(z), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("c", [1, 3])
def test_each_op_in_range(op: str, c: int) -> None:
    aug = Augmenter(hflip=False, translate=0.0, cutout=0.0, ra_num_ops=1, ops=[op])
    x = _images(128, c, 32) // 2 + 60  # not full-range (AutoContrast acts), > 255 pixels (Equalize acts)
    y = aug.strong(x, torch.Generator().manual_seed(0), normalize=False)
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    changed = (y - x.float() / 255).abs().amax((1, 2, 3)) > 1e-4
    if op == "Identity" or (op == "Color" and c == 1):
        assert not changed.any()
    else:
        assert changed.float().mean() > 0.5, op


@pytest.mark.parametrize("kind", ["weak", "strong"])
def test_generator_determinism(kind: str) -> None:
    aug, x = _aug(3), _images(32, 3, 32)
    fn = getattr(aug, kind)
    a = fn(x, torch.Generator().manual_seed(7))
    b = fn(x, torch.Generator().manual_seed(7))
    c = fn(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = fn(x)
    torch.manual_seed(3)
    assert torch.equal(d, fn(x))


def test_no_flip_when_disabled() -> None:
    x = torch.zeros(256, 1, 8, 8, dtype=torch.uint8)
    x[..., :4] = 255  # left half white: any flip makes the left column dark
    y = Augmenter(hflip=False, translate=0.0).weak(x, normalize=False)
    assert torch.equal(y, x.float() / 255)
    flipped = Augmenter(hflip=True, translate=0.0).weak(x, torch.Generator().manual_seed(0), normalize=False)
    n_flipped = (flipped[:, 0, 0, 0] == 0).sum().item()
    assert 64 < n_flipped < 192


@pytest.mark.parametrize("c,size", SHAPES)
def test_weak_identity_without_flip_and_translate(c: int, size: int) -> None:
    aug = _aug(c, hflip=False, translate=0.0)
    x = _images(16, c, size)
    y = aug.weak(x)
    torch.testing.assert_close(aug.denormalize(y), x.float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, aug.normalize(x.float() / 255))


def test_translate_is_integer_reflect_shift() -> None:
    aug = Augmenter(hflip=False, translate=0.125)
    x = _images(64, 1, 32)
    y = aug.weak(x, torch.Generator().manual_seed(0), normalize=False)
    padded = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4), mode="reflect")
    crops = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [B, 1, 9, 9, 32, 32]: every shift
    match = (crops == y[:, :, None, None]).flatten(4).all(-1)
    assert match.flatten(1).any(1).all()  # each output is one of the 81 reflect-padded crops
    assert _n_unique(y) > 30


@pytest.mark.parametrize("c,size", [(1, 8), (3, 32)])
def test_cutout_is_a_constant_square(c: int, size: int) -> None:
    aug = _aug(c, hflip=False, translate=0.0, ra_num_ops=0, cutout=0.5)
    x = _images(256, c, size)  # uint8 / 255 is never exactly 0.5
    y = aug.strong(x, torch.Generator().manual_seed(0), normalize=False)
    grey = y == 0.5
    assert torch.equal(grey, grey[:, :1].expand_as(grey))  # same box in every channel
    box = grey[:, 0]
    rows, cols = box.any(2), box.any(1)
    assert box.any((1, 2)).all()
    assert torch.equal(box, rows[:, :, None] & cols[:, None, :])  # a rectangle
    h, w = rows.sum(1), cols.sum(1)
    max_side = round(0.5 * size)
    assert h.max() <= max_side and w.max() <= max_side
    at_border = rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1]
    assert ((h == w) | at_border).all()  # a square unless clipped at a border
    torch.testing.assert_close(y[~grey], x.float()[~grey] / 255)  # nothing else touched


def test_strong_is_batched_fast() -> None:
    aug, x = _aug(3), _images(2048, 3, 8)
    aug.strong(x[:64])  # warm-up
    t0 = time.perf_counter()
    aug.strong(x)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("c", [1, 3])
def test_histogram_ops_match_torchvision(c: int) -> None:
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = _images(8, c, 32)
    x[1] = x[1] // 4 + 60  # low contrast
    x[2] = 9  # constant
    xf, s = x.float() / 255, torch.full((8,), 0.5)
    cases = [  # (ours, reference on uint8, tolerance in grey levels: torchvision truncates autocontrast)
        (augment._equalize, tf.equalize, 1e-3),
        (augment._autocontrast, tf.autocontrast, 1.001),
        (augment._posterize, lambda im: tf.posterize(im, 6), 1e-3),
        (augment._solarize, lambda im: tf.solarize(im, 128), 1e-3),
    ]
    for ours, ref, atol in cases:
        expected = torch.stack([ref(im) for im in x]).float()
        torch.testing.assert_close(ours(xf, s) * 255, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["weak", "strong"])
@pytest.mark.parametrize("gen_device", ["cpu", "cuda", None])
def test_cuda(kind: str, gen_device: str | None) -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    aug = _aug(3)
    x = _images(128, 3, 32).to("cuda")
    gen = None if gen_device is None else torch.Generator(device=gen_device).manual_seed(0)
    y = getattr(aug, kind)(x, gen, normalize=False)
    assert y.device == x.device and y.dtype == torch.float32 and y.shape == x.shape
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    same = x[:1].expand_as(x).contiguous()
    assert _n_unique(getattr(aug, kind)(same, gen)) >= 8
    if gen_device == "cpu":  # same CPU draws → same parameters as on the CPU
        ref = getattr(aug, kind)(x.cpu(), torch.Generator().manual_seed(0), normalize=False)
        diff = (y.cpu() - ref).abs()
        assert (diff.max() == 0) if kind == "weak" else (diff.mean() < 1e-2)


@pytest.mark.parametrize("c,size", [*SHAPES, (3, 96)])
@pytest.mark.parametrize("ops", [None, ("Equalize", "Rotate", "Posterize"), ("Solarize", "Color")])
def test_sync_free_path_gives_the_same_images(c: int, size: int, ops) -> None:
    """The CUDA default (every colour op on the whole batch, the whole batch warped, no host sync)
    and the sorted-chunks path (the CPU default) give bit-identical images for the same draws."""
    x = _images(256, c, size, seed=3)
    for seed in range(2):
        chunks = _aug(c, ops=ops, sync_free=False).strong(x, torch.Generator().manual_seed(seed))
        free = _aug(c, ops=ops, sync_free=True).strong(x, torch.Generator().manual_seed(seed))
        assert torch.equal(chunks, free)
