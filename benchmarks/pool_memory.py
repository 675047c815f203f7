"""Node memory of the unlabeled pool and labelled sets with 1, 2 and 4 workers on one node.

Writes an STL-10-sized fixture in torchvision's on-disk layout (``stl10_binary/``: train 5,000,
test 8,000 and ``--unlabeled`` 96×96×3 uint8 images of noise) to a scratch folder, then starts 1, 2
and 4 worker processes (spawned, as Ray starts its DDP workers: a fresh interpreter each) that each
call ``data_of(cfg)`` on an STL-10 run config (``labels_per_class: 25``, ``val_per_class: 50``),
touch every page of the four datasets (as batches gathered over an epoch do) and wait.  While they
wait, the parent sums over the workers PSS (proportional set size, ``/proc/<pid>/smaps_rollup``:
a page shared by k processes counts 1/k in each, so the sum is what the node holds) and RSS (a
shared page counts fully in each).

Modes (``--mode``, default both, each with a fresh, empty cache folder):

* ``copy``: ``RAYKD_CACHE=off``, every process builds its own pool (what raykd did before the shared
  cache);
* ``shared``: a fresh ``RAYKD_CACHE``: the first worker builds the data and writes the node's cache,
  every worker maps it.

    python benchmarks/pool_memory.py                      # 100,000 unlabeled images (2.76 GB)
    python benchmarks/pool_memory.py --unlabeled 20000 --workers 1 2
    python benchmarks/pool_memory.py --unlabeled 20000 --ray   # Ray Train workers (no data_of time)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE = 3 * 96 * 96


def write_stl10(root: Path, n_unlabeled: int) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 5000), ("test", 8000), ("unlabeled", n_unlabeled)):
        with open(folder / f"{split}_X.bin", "wb") as f:
            for start in range(0, n, 10000):
                rng.integers(0, 256, size=(min(10000, n - start), IMAGE), dtype=np.uint8).tofile(f)
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")


def worker(root: str, ready, release) -> None:
    import torch

    from raykd.config import parse_run_config
    from raykd.data import data_of

    torch.set_num_threads(1)
    cfg = parse_run_config({
        "data": {"name": "stl10", "root": root, "labels_per_class": 25, "val_per_class": 50, "seed": 0},
        "model": {"name": "small_cnn"},
        "method": {"name": "fixmatch"},
    })  # fmt: skip
    start = time.perf_counter()
    data = data_of(cfg)
    seconds = time.perf_counter() - start
    total = 0
    for ds in (data.labeled, data.unlabeled, data.val, data.test):
        for i in range(0, len(ds), 4096):  # every page, as an epoch of gathered batches reads them
            total += int(ds.images[i : i + 4096, 0, 0, 0].sum()) + int(ds.images[i : i + 4096].max())
    ready.put((os.getpid(), seconds, len(data.unlabeled), total))
    release.wait()


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of ``pid`` in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            values[key] = int(rest.split()[0])
    return values["Pss"], values["Rss"]


def measure(root: Path, n_workers: int, cache: str) -> dict:
    os.environ["RAYKD_CACHE"] = cache
    ctx = mp.get_context("spawn")
    ready, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(str(root), ready, release)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    reports = [ready.get(timeout=1800) for _ in procs]
    pss = rss = 0
    for pid, *_ in reports:
        p, r = memory_kb(pid)
        pss, rss = pss + p, rss + r
    release.set()
    for p in procs:
        p.join()
    sums = {r[3] for r in reports}
    assert len(sums) == 1, "the workers saw different data"
    return {"pss": pss / 2**20, "rss": rss / 2**20, "seconds": max(r[1] for r in reports), "pool": reports[0][2]}


def ray_worker(config: dict) -> None:
    """A Ray Train worker: ``data_of``, touch every page, measure once every worker holds its data."""
    import ray.train
    import torch.distributed as dist

    from raykd.config import parse_run_config
    from raykd.data import data_of

    cfg = parse_run_config({
        "data": {"name": "stl10", "root": config["root"], "labels_per_class": 25, "val_per_class": 50, "seed": 0},
        "model": {"name": "small_cnn"},
        "method": {"name": "fixmatch"},
    })  # fmt: skip
    data = data_of(cfg)
    for ds in (data.labeled, data.unlabeled, data.val, data.test):
        for i in range(0, len(ds), 4096):
            int(ds.images[i : i + 4096].max())
    dist.barrier()
    time.sleep(1)
    pss, rss = memory_kb(os.getpid())
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"{rank}.txt").write_text(f"{pss} {rss} {len(data.unlabeled)}")
    dist.barrier()


def measure_ray(root: Path, n_workers: int, cache: str, scratch: Path) -> dict:
    """The same with ``n_workers`` Ray Train (TorchTrainer, gloo) workers of half a CPU each."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(tempfile.mkdtemp(dir=scratch))
    env = {"RAYKD_CACHE": cache, "PYTHONPATH": os.pathsep.join(sys.path)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        TorchTrainer(
            ray_worker,
            train_loop_config={"root": str(root), "out": str(out)},
            scaling_config=ScalingConfig(num_workers=n_workers, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(storage_path=str(scratch / "ray"), name=f"w{n_workers}"),
        ).fit()
    finally:
        ray.shutdown()
    rows = [list(map(int, f.read_text().split())) for f in out.glob("*.txt")]
    pss, rss = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return {"pss": pss / 2**20, "rss": rss / 2**20, "seconds": float("nan"), "pool": rows[0][2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unlabeled", type=int, default=100_000, help="images in unlabeled_X.bin")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mode", choices=["copy", "shared", "both"], default="both")
    p.add_argument("--ray", action="store_true", help="Ray Train workers (TorchTrainer) instead of processes")
    p.add_argument("--scratch", default=None, help="folder for the fixture and caches (default: a temp dir)")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="raykd-pool-", dir=args.scratch))
    try:
        t = time.perf_counter()
        write_stl10(scratch / "stl10", args.unlabeled)
        size = sum(f.stat().st_size for f in (scratch / "stl10" / "stl10_binary").iterdir()) / 2**30
        print(f"fixture: {args.unlabeled:,} unlabeled images, {size:.2f} GiB on disk ({time.perf_counter() - t:.0f} s)")
        modes = ["copy", "shared"] if args.mode == "both" else [args.mode]
        print("| mode | workers | pool images | PSS total (GiB) | RSS total (GiB) | PSS per worker (GiB) "
              "| data_of, slowest worker (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for mode in modes:
            for n in args.workers:
                cache = "off"
                if mode == "shared":
                    cache = str(scratch / f"cache-{n}")  # empty: the first worker builds and writes it
                if args.ray:
                    r = measure_ray(scratch / "stl10", n, cache, scratch)
                else:
                    r = measure(scratch / "stl10", n, cache)
                secs = "n/a" if math.isnan(r["seconds"]) else f"{r['seconds']:.1f}"
                print(f"| {mode} | {n} | {r['pool']:,} | {r['pss']:.2f} | {r['rss']:.2f} | {r['pss'] / n:.2f} "
                      f"| {secs} |", flush=True)  # fmt: skip
                if mode == "shared":
                    shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
