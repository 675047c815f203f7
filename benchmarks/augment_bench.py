"""Throughput of batched :meth:`raykd.data.augment.Augmenter.strong` vs per-sample torchvision.

The baseline is what a DataLoader worker does: the FixMatch strong pipeline (flip, reflect-padded
RandomCrop, RandAugment(num_ops=2), Cutout as RandomErasing of a grey square up to 1/4 of the area,
Normalize) applied one uint8 image at a time on the CPU, then stacked into a batch.  Both
torchvision.transforms v1 and v2 are timed; the faster one is the baseline.

Run: ``python benchmarks/augment_bench.py [--device cuda] [--batch 448] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from raykd.data.augment import Augmenter


def _torchvision_pipeline(size: int, channels: int, version: str) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = [0.5] * channels, [0.5] * channels
    pad = int(0.125 * size)
    if version == "v2":
        from torchvision.transforms import v2 as T

        return T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandomCrop(size, padding=pad, padding_mode="reflect"),
                T.RandAugment(num_ops=2),
                T.ToDtype(torch.float32, scale=True),
                T.RandomErasing(p=1.0, scale=(0.0, 0.25), ratio=(1.0, 1.0), value=0.5),
                T.Normalize(mean, std),
            ]
        )
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomCrop(size, padding=pad, padding_mode="reflect"),
            T.RandAugment(num_ops=2),
            T.ConvertImageDtype(torch.float32),
            T.RandomErasing(p=1.0, scale=(0.0, 0.25), ratio=(1.0, 1.0), value=0.5),
            T.Normalize(mean, std),
        ]
    )


def _best_rate(fn: Callable[[], object], n_images: int, repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def bench_augment(
    batch: int = 448, size: int = 32, channels: int = 3, device: str = "cpu", repeats: int = 5, **augmenter: object
) -> dict:
    """Images/s of ``Augmenter.strong`` on ``device`` vs a per-sample torchvision loop on the CPU.

    Returns ``{"raykd_img_s", "torchvision_img_s", "ratio", "torchvision_v1_img_s",
    "torchvision_v2_img_s"}``; ``torchvision_img_s`` is the faster of v1 and v2 and ``ratio`` is
    ``raykd_img_s / torchvision_img_s`` (best of ``repeats`` timings each).  ``augmenter``: further
    :class:`~raykd.data.augment.Augmenter` arguments (e.g. ``sync_free=False``).
    """
    dev = torch.device(device)
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    aug = Augmenter(hflip=True, mean=(0.5,) * channels, std=(0.5,) * channels, **augmenter)
    on_dev = images.to(dev)
    raykd = _best_rate(lambda: aug.strong(on_dev), batch, repeats, sync)

    rates = {}
    for version in ("v1", "v2"):
        tf = _torchvision_pipeline(size, channels, version)
        rates[version] = _best_rate(
            lambda tf=tf: torch.stack([tf(im) for im in images]), batch, max(1, repeats // 2), lambda: None
        )
    tv = max(rates.values())
    return {
        "raykd_img_s": raykd,
        "torchvision_img_s": tv,
        "ratio": raykd / tv,
        "torchvision_v1_img_s": rates["v1"],
        "torchvision_v2_img_s": rates["v2"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device={args.device} batch={args.batch} torch threads={torch.get_num_threads()}")
    print(f"{'shape':>10} {'raykd img/s':>12} {'tv v1 img/s':>12} {'tv v2 img/s':>12} {'ratio':>7}")
    for size, channels in ((32, 3), (28, 1)):
        r = bench_augment(args.batch, size, channels, args.device, args.repeats)
        shape = f"{size}x{size}x{channels}"
        print(
            f"{shape:>10} {r['raykd_img_s']:12.0f} {r['torchvision_v1_img_s']:12.0f} "
            f"{r['torchvision_v2_img_s']:12.0f} {r['ratio']:7.1f}"
        )


if __name__ == "__main__":
    main()
