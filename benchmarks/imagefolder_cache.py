"""Image-folder pools: decoding every JPEG vs loading the decoded array from the disk cache.

Writes N synthetic 64×64 JPEGs (noise over a per-class colour, 10 class folders) to a scratch folder,
then times, each in a fresh Python process (as a DDP worker or a trial starts):

1. ``RAYKD_CACHE=off``: decode every file (what each worker did before the cache);
2. an empty cache: decode once and write the array (the first worker on a node);
3. the warm cache: map the array (every later worker and trial on that node).

    python benchmarks/imagefolder_cache.py                  # 20,000 images, 32 px (CIFAR-size pool)
    python benchmarks/imagefolder_cache.py --images 100000 --size 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LOAD = "import sys; from raykd.data.imagefolder import load_imagefolder as f; f(sys.argv[1], 3, int(sys.argv[2]))"


def write_pool(root: Path, n: int, side: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = i % 10
        colour = np.array([25 * cls, 255 - 25 * cls, 128], dtype=np.int16)
        img = np.clip(colour + rng.integers(-40, 40, size=(side, side, 3)), 0, 255).astype(np.uint8)
        (root / f"c{cls}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"c{cls}" / f"{i:06d}.jpg", quality=90)


def timed_load(root: Path, size: int, cache: str) -> float:
    env = {**os.environ, "RAYKD_CACHE": cache}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD, str(root), str(size)], env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=32, help="the labeled dataset's image size (resize target)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raykd-ifcache-"))
    try:
        t0 = time.perf_counter()
        write_pool(work / "pool", args.images)
        print(f"wrote {args.images} JPEGs (64x64) in {time.perf_counter() - t0:.1f} s", flush=True)
        offs = [timed_load(work / "pool", args.size, "off") for _ in range(2)]  # the first warms the OS file cache
        baseline = min(offs)
        cold = timed_load(work / "pool", args.size, str(work / "cache"))
        warm = timed_load(work / "pool", args.size, str(work / "cache"))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import raykd.data.imagefolder"], check=True)
        imports = time.perf_counter() - t0
        print(f"\n| {args.images} images → {args.size} px | s per process (incl. Python + torch import) |")
        print("|---|---|")
        print(f"| decode every file (RAYKD_CACHE=off; best of {offs[0]:.2f} and {offs[1]:.2f}) | {baseline:.2f} |")
        print(f"| first process: decode + write the cache | {cold:.2f} |")
        print(f"| later processes: load the cached array | {warm:.2f} |")
        print(f"| (Python + imports alone) | {imports:.2f} |")
        speedup = (baseline - imports) / max(warm - imports, 1e-3)
        print(f"\nloading, imports excluded: {speedup:.0f}x faster from the cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
