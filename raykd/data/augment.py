"""Batched weak and strong image augmentation on the training device.

:class:`Augmenter` takes a whole batch (uint8 ``[B, C, H, W]``, or float in [0, 1]) on any device and
returns float32 ``[B, C, H, W]`` on the same device, normalised with ``mean``/``std`` unless
``normalize=False`` (then in [0, 1]).  Every sample draws its own random parameters; the work is
done by a fixed number of batched tensor ops (loops run over op *types*, never over samples).

**weak**: horizontal flip (p = 0.5, only if ``hflip``), then an integer translation of up to
``int(translate * size)`` pixels in x and y with reflect padding, i.e.
``RandomCrop(size, padding=int(translate * size), padding_mode="reflect")``.  Flip and crop are one
gather with per-sample index arithmetic.

**strong**: weak, then RandAugment, then Cutout.  RandAugment applies ``ra_num_ops`` ops per sample,
each drawn uniformly from ``ops`` with an integer magnitude ``m`` drawn uniformly from
``[1, ra_magnitude_max]``; ``s = m / ra_magnitude_max`` in (0, 1].  Ranges follow FixMatch's
RandAugment table (higher ``m`` is always the stronger distortion):

============  ==============================================================================
op            effect (``s`` = normalised magnitude, ``±`` = random sign per sample)
============  ==============================================================================
Identity      none
AutoContrast  per-channel stretch of [min, max] to [0, 1]
Equalize      per-channel histogram equalisation on 256 levels, PIL's algorithm (so a no-op where
              fewer than 255 pixels of a channel lie below its brightest level: always for 8x8)
Rotate        rotation by ``± 30° · s`` about the centre
Solarize      invert values ``>= 1 - s`` (threshold in [0, 1))
Color         saturation: blend with greyscale, factor ``0.95 - 0.9 s`` (identity for 1 channel)
Posterize     keep ``8 - floor(4 s)`` bits (4 to 8)
Contrast      blend with the image's mean grey level, factor ``0.95 - 0.9 s``
Brightness    blend with black, factor ``0.95 - 0.9 s``
Sharpness     blend with PIL's 3x3 SMOOTH-filtered image, factor ``0.95 - 0.9 s``
ShearX/Y      shear ``± 0.3 s`` about the centre
TranslateX/Y  shift ``± 0.3 s`` of the width / height (sub-pixel, bilinear)
============  ==============================================================================

Enhancement factors lie in [0.05, 0.95) as in FixMatch (1 would be the identity).  Colour ops run in
slot order on the subset of the batch that drew them.  Geometric ops are composed into one affine
matrix per sample and applied once, after the colour ops, by a single ``affine_grid`` + bilinear
``grid_sample`` (one interpolation instead of two; the only difference from strict slot order is
that colour ops neither see nor alter the fill).  Areas warped in from outside the image are grey 0.5.

**Cutout**: a square of side uniform in ``[1, round(cutout * min(H, W))]`` (0 disables it) centred
at a uniform pixel, clipped to the image, filled with grey 0.5 (in [0, 1] units).

**Randomness**: every draw comes from ``generator`` if given (drawn on the generator's device, then
moved to the batch's device, so a CPU generator works for a CUDA batch), else from the global RNG of
the batch's device.  A call makes a single RNG draw, so results are reproducible by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Solarize",
    "Color",
    "Posterize",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
GEOMETRIC: frozenset[str] = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
FILL = 0.5
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per device: a fresh one per call would be a
    blocking host-to-device copy, which on CUDA waits for the device to drain its queue."""
    key = (values, device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


# --- colour ops: (x float [n, C, H, W] in [0, 1], s [n] in (0, 1]) -> same shape -------------------


def _factor(s: torch.Tensor) -> torch.Tensor:
    return (0.95 - 0.9 * s).view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``f * x + (1 - f) * degenerate`` clipped to [0, 1] (PIL ImageEnhance semantics)."""
    return (degenerate + f * (x - degenerate)).clamp_(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = _constant((0.299, 0.587, 0.114), x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0).round_()


def _autocontrast(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    ok = hi > lo
    scale = torch.where(ok, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    return ((x - torch.where(ok, lo, torch.zeros_like(lo))) * scale).clamp_(0.0, 1.0)


def _equalize(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    rows, pixels = n * c, h * w
    v = _quantise(x).long().view(rows, pixels)
    offsets = torch.arange(rows, device=x.device).unsqueeze(1) * 256
    flat = (v + offsets).view(-1)  # a histogram by scatter_add: bincount reads its max back to the host
    hist = torch.zeros(rows * 256, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    hist = hist.view(rows, 256)
    last = hist.gather(1, v.amax(1, keepdim=True))  # count of the brightest level present
    step = torch.div(pixels - last, 255, rounding_mode="floor")
    cum = hist.cumsum(1) - hist  # exclusive cumulative histogram
    lut = torch.div(cum + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    levels = torch.arange(256, device=x.device).expand(rows, 256)
    lut = torch.where(step > 0, lut.clamp(0, 255), levels)
    return lut.gather(1, v).view(n, c, h, w).float() / 255.0


def _solarize(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= (1.0 - s).view(-1, 1, 1, 1), 1.0 - x, x)


def _color(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] != 3 else _blend(x, _grey(x), _factor(s))


def _posterize(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    q = torch.pow(2.0, torch.floor(4.0 * s).clamp_(0, 4)).view(-1, 1, 1, 1)  # 2 ** (8 - bits)
    return torch.floor(_quantise(x) / q) * q / 255.0


def _contrast(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), _factor(s))


def _brightness(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x * _factor(s)).clamp_(0.0, 1.0)


def _sharpness(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2:]
    smooth = x.clone()
    if h > 2 and w > 2:  # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; border kept
        box = F.avg_pool2d(x, 3, stride=1) * 9.0
        smooth[..., 1:-1, 1:-1] = (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0
    return _blend(x, smooth, _factor(s))


COLOUR_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Solarize": _solarize,
    "Color": _color,
    "Posterize": _posterize,
    "Contrast": _contrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
}


def _uniform(n: int, k: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``[n, k]`` uniforms in [0, 1) on ``device``, drawn on the generator's device."""
    src = generator.device if generator is not None else device
    return torch.rand(n, k, generator=generator, device=src).to(device, non_blocking=True)


def _randint(u: torch.Tensor, high: int) -> torch.Tensor:
    """Map uniforms in [0, 1) to integers in ``[0, high)``."""
    return (u * high).long().clamp_(0, high - 1)


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect indices in ``[-(size-1), 2(size-1)]`` into ``[0, size)`` (edge pixel not repeated)."""
    last = size - 1
    return last - (last - idx.abs()).abs()


class Augmenter:
    """Weak/strong augmentation of a whole batch on its own device (see the module docstring).

    Args:
        hflip: random horizontal flips (False for digits, SVHN).
        translate: max translation of the weak augmentation, as a fraction of the size.
        ra_num_ops: RandAugment ops per sample (0 gives weak + Cutout).
        ra_magnitude_max: magnitudes are drawn from ``[1, ra_magnitude_max]``.
        cutout: max Cutout side as a fraction of the smaller image side (0 disables it).
        mean, std: per-channel normalisation constants (length 1 or C) for images in [0, 1].
        ops: RandAugment op names, a subset of :data:`OPS` (default: all of them).
        sync_free: how RandAugment picks each sample's ops.  False: sort the batch by op and run each
            op on its chunk (the chunk sizes are read back to the host); True: run every colour op on
            the whole batch and keep each sample's own result, and warp the whole batch (identity
            for the samples that drew no geometric op), so the host never waits for the device
            (more arithmetic, no sync).  Both give the same images.  None (default): True on CUDA,
            False elsewhere.
    """

    def __init__(
        self,
        hflip: bool,
        translate: float = 0.125,
        ra_num_ops: int = 2,
        ra_magnitude_max: int = 10,
        cutout: float = 0.5,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
        ops: Sequence[str] | None = None,
        sync_free: bool | None = None,
    ):
        ops = tuple(OPS if ops is None else ops)
        unknown = [o for o in ops if o not in OPS]
        if unknown or not ops:
            raise ValueError(f"unknown or empty RandAugment ops {unknown or ops}; choose from {OPS}")
        if not (0 <= translate < 1 and 0 <= cutout <= 1 and ra_num_ops >= 0 and ra_magnitude_max >= 1):
            raise ValueError("need 0 <= translate < 1, 0 <= cutout <= 1, ra_num_ops >= 0 and ra_magnitude_max >= 1")
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError("mean and std must have the same length and std > 0")
        self.hflip, self.translate, self.cutout = hflip, translate, cutout
        self.ra_num_ops, self.ra_magnitude_max, self.ops = ra_num_ops, ra_magnitude_max, ops
        self.mean, self.std = tuple(mean), tuple(std)
        self._colour = [COLOUR_OPS.get(o) for o in ops]
        self._geo_ids = [i for i, o in enumerate(ops) if o in GEOMETRIC]
        self._stats: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.sync_free = sync_free

    # --- public API -----------------------------------------------------------------------------

    def weak(self, x: torch.Tensor, generator: torch.Generator | None = None, normalize: bool = True) -> torch.Tensor:
        """Flip + translate; float32 on ``x.device``, normalised unless ``normalize=False``."""
        self._check(x)
        u = _uniform(x.shape[0], 3, x.device, generator)
        return self._finish(self._flip_translate(x, u), normalize)

    def strong(self, x: torch.Tensor, generator: torch.Generator | None = None, normalize: bool = True) -> torch.Tensor:
        """Flip + translate, RandAugment, Cutout; float32 on ``x.device``, normalised by default."""
        self._check(x)
        n_ra = 3 * self.ra_num_ops
        u = _uniform(x.shape[0], 3 + n_ra + 3, x.device, generator)
        y = self._flip_translate(x, u[:, :3])
        y = self._randaugment(y, u[:, 3 : 3 + n_ra])
        return self._finish(self._cutout(y, u[:, 3 + n_ra :]), normalize)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``[B, C, H, W]`` in [0, 1] → ``(x - mean) / std``."""
        mean, std = self._constants(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (for plots)."""
        mean, std = self._constants(x)
        return x * std + mean

    # --- internals ------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(x.shape)}")
        if len(self.mean) not in (1, x.shape[1]):
            raise ValueError(f"mean/std have {len(self.mean)} entries for {x.shape[1]} channels")

    def _constants(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.shape[1])
        if key not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            self._stats[key] = (mean, std)
        return self._stats[key]

    def _finish(self, y: torch.Tensor, normalize: bool) -> torch.Tensor:
        return self.normalize(y) if normalize else y

    def _flip_translate(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One gather: flip (u[:, 0] < 0.5) and reflect-padded crop offsets (u[:, 1:3]) per sample."""
        b, c, h, w = x.shape
        ph, pw = min(int(self.translate * h), h - 1), min(int(self.translate * w), w - 1)
        dy = _randint(u[:, 1], 2 * ph + 1) - ph
        dx = _randint(u[:, 2], 2 * pw + 1) - pw
        rows = _reflect(torch.arange(h, device=x.device) + dy.unsqueeze(1), h)  # [B, H]
        cols = _reflect(torch.arange(w, device=x.device) + dx.unsqueeze(1), w)  # [B, W]
        if self.hflip:
            cols = torch.where((u[:, :1] < 0.5), w - 1 - cols, cols)
        idx = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
        y = x.reshape(b, c, h * w).gather(2, idx).view(b, c, h, w)
        return y.float().div_(255.0) if y.dtype == torch.uint8 else y.float().clamp(0.0, 1.0)

    def _randaugment(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour ops per slot on the subsets that drew them; geometric ops composed into one warp."""
        b, k = x.shape[0], len(self.ops)
        theta = torch.eye(3, device=x.device).expand(b, 3, 3)
        warped = torch.zeros(b, dtype=torch.bool, device=x.device)
        geo_ids = _constant(tuple(self._geo_ids), x.device, torch.long)
        free = self.sync_free if self.sync_free is not None else x.device.type == "cuda"
        for slot in range(self.ra_num_ops):
            op = _randint(u[:, 3 * slot], k)
            s = (_randint(u[:, 3 * slot + 1], self.ra_magnitude_max) + 1).float() / self.ra_magnitude_max
            signed = torch.where(u[:, 3 * slot + 2] < 0.5, -s, s)
            if self._geo_ids:
                theta = theta @ self._affine(op, signed, x.shape[2], x.shape[3])
                warped |= torch.isin(op, geo_ids)
            x = self._colour_everywhere(x, op, s) if free else self._apply_colour(x, op, s)
        if not self._geo_ids:
            return x
        return self._warp_everywhere(x, theta, warped) if free else self._warp(x, theta, warped)

    def _colour_everywhere(self, x: torch.Tensor, op: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """:meth:`_apply_colour` without a host sync: each colour op on the whole batch, each sample
        keeping the result of the op it drew."""
        for i, fn in enumerate(self._colour):
            if fn is not None:
                x = torch.where((op == i).view(-1, 1, 1, 1), fn(x, s), x)
        return x

    def _apply_colour(self, x: torch.Tensor, op: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Sort the batch by op, run each colour op on its contiguous chunk, scatter back."""
        counts = torch.bincount(op, minlength=len(self.ops)).tolist()
        if all(n == 0 or fn is None for n, fn in zip(counts, self._colour, strict=True)):
            return x
        order = torch.argsort(op)
        xs, ss = x[order], s[order]
        for fn, xc, sc in zip(self._colour, xs.split(counts), ss.split(counts), strict=True):
            if fn is not None and xc.shape[0] > 0:
                xc.copy_(fn(xc, sc))
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        return xs.index_select(0, inverse)

    def _affine(self, op: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Per-sample 3x3 output→input maps in pixel coordinates centred on the image."""

        def pick(name: str, value: torch.Tensor) -> torch.Tensor:
            if name not in self.ops:
                return torch.zeros_like(value)
            return torch.where(op == self.ops.index(name), value, torch.zeros_like(value))

        ang = pick("Rotate", v * math.radians(MAX_ROTATE_DEG))
        shx, shy = pick("ShearX", v * MAX_SHEAR), pick("ShearY", v * MAX_SHEAR)
        tx, ty = pick("TranslateX", v * MAX_TRANSLATE * w), pick("TranslateY", v * MAX_TRANSLATE * h)
        cos, sin = torch.cos(ang), torch.sin(ang)
        zero, one = torch.zeros_like(v), torch.ones_like(v)
        return torch.stack([cos, shx - sin, tx, sin + shy, cos, ty, zero, zero, one], 1).view(-1, 3, 3)

    def _warp(self, x: torch.Tensor, theta: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """Apply the pixel-space maps to the warped samples with one bilinear grid_sample."""
        idx = warped.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        h, w = x.shape[2:]
        # pixel-centred coordinates = normalised coordinates (align_corners=False) scaled by size / 2
        scale = _constant((w / 2, h / 2, 1.0), x.device)
        t = (theta[idx] * scale.view(1, 1, 3)) / scale.view(1, 3, 1)
        sub = x.index_select(0, idx)
        grid = F.affine_grid(t[:, :2], list(sub.shape), align_corners=False)
        out = F.grid_sample(sub - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x.index_copy(0, idx, (out + FILL).clamp_(0.0, 1.0))

    def _warp_everywhere(self, x: torch.Tensor, theta: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """:meth:`_warp` without a host sync: the whole batch through the grid, the samples that drew
        no geometric op keep their input."""
        h, w = x.shape[2:]
        scale = _constant((w / 2, h / 2, 1.0), x.device)
        t = (theta * scale.view(1, 1, 3)) / scale.view(1, 3, 1)
        grid = F.affine_grid(t[:, :2], list(x.shape), align_corners=False)
        out = F.grid_sample(x - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(warped.view(-1, 1, 1, 1), (out + FILL).clamp_(0.0, 1.0), x)

    def _cutout(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Grey square per sample: side uniform in [1, max_side], centre uniform, clipped."""
        h, w = x.shape[2:]
        max_side = round(self.cutout * min(h, w))
        if max_side < 1:
            return x
        side = _randint(u[:, 0], max_side) + 1
        y0 = _randint(u[:, 1], h) - side // 2
        x0 = _randint(u[:, 2], w) - side // 2
        ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_y = (ys >= y0.unsqueeze(1)) & (ys < (y0 + side).unsqueeze(1))  # [B, H]
        in_x = (xs >= x0.unsqueeze(1)) & (xs < (x0 + side).unsqueeze(1))  # [B, W]
        return x.masked_fill((in_y.unsqueeze(2) & in_x.unsqueeze(1)).unsqueeze(1), FILL)
