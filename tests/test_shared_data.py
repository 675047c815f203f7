"""The node's shared data cache (raykd.data.shared): the same bytes as building the data in the
process, and one copy of the pool in memory for several processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.config import OpenSetConfig
from raykd.data import prepare_data, shared
from tests.test_data import write_cifar, write_stl

REPO = Path(__file__).resolve().parents[1]


def same(a, b) -> None:
    for part in ("labeled", "unlabeled", "val", "test"):
        x, y = getattr(a, part), getattr(b, part)
        assert (x is None) == (y is None), part
        if x is not None:
            assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels), part
            assert x.images.dtype == torch.uint8 and x.labels.dtype == torch.int64
    assert (a.num_classes, a.hflip, a.mean, a.std, a.classes) == (b.num_classes, b.hflip, b.mean, b.std, b.classes)


@pytest.mark.parametrize("open_set", [None, {"unseen_classes": [1, 4]}])
def test_the_shared_data_is_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_set) -> None:
    monkeypatch.setattr(shared, "MIN_BYTES", 0)
    write_stl(tmp_path / "stl", unlabeled=6)
    write_cifar(tmp_path / "cifar", "cifar10")
    for name, root in (("stl10", tmp_path / "stl"), ("cifar10", tmp_path / "cifar")):
        osc = OpenSetConfig(**open_set) if open_set else None
        args = (name, str(root), 1, 1, 3)
        monkeypatch.setenv("RAYKD_CACHE", "off")
        built = prepare_data(*args, open_set=osc)
        monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
        first = prepare_data(*args, open_set=osc)  # builds and writes the cache
        shared._map.cache_clear()
        again = prepare_data(*args, open_set=osc)  # maps it
        same(built, first)
        same(built, again)
    assert len(list((tmp_path / "cache" / "data").glob("*/meta.json"))) == 2
    # another split, or a changed file, is another folder
    prepare_data("stl10", str(tmp_path / "stl"), 1, 0, 3)
    assert len(list((tmp_path / "cache" / "data").glob("*/meta.json"))) == 3
    # a builder killed while writing leaves a temporary folder: the next builder removes it
    stale = tmp_path / "cache" / "data" / ".stl10-0123-x"
    stale.mkdir()
    monkeypatch.setattr(shared, "cache_key", lambda *a: "0123")
    prepare_data("stl10", str(tmp_path / "stl"), 1, 0, 4)
    assert not stale.exists() and (tmp_path / "cache" / "data" / "stl10-0123" / "meta.json").is_file()


def test_small_datasets_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "cache"))
    prepare_data("digits", None, 5, 1, 0)
    write_stl(tmp_path / "stl", unlabeled=6)  # a few MB: under MIN_BYTES
    prepare_data("stl10", str(tmp_path / "stl"), 1, 1, 0)
    assert not (tmp_path / "cache" / "data").exists()


HOLD = """
import os, sys
from raykd.data import prepare_data
data = prepare_data("stl10", sys.argv[1], 1, 1, 0)
pool = data.unlabeled.images
assert int(pool.reshape(pool.shape[0], -1).amax(dim=1).sum()) >= 0  # touch every page
print(os.getpid(), pool.numel(), flush=True)
sys.stdin.readline()
"""


def pss_rss(pid: int) -> tuple[int, int]:
    rows = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return int(rows["Pss"].split()[0]) * 1024, int(rows["Rss"].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's smaps_rollup")
def test_two_processes_share_the_pool(tmp_path: Path) -> None:
    write_stl(tmp_path / "stl", unlabeled=2600)  # 72 MB: over MIN_BYTES
    env = {**os.environ, "RAYKD_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for _ in range(2):  # one after the other: the first builds the cache, the second maps it
            p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "stl")], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
            procs.append(p)
            pid, pool_bytes = map(int, p.stdout.readline().split())
            assert pid == p.pid
        assert pool_bytes > 70e6
        for p in procs:
            pss, rss = pss_rss(p.pid)
            # the pool's pages are in both: each process is charged half of them
            assert rss - pss > 0.4 * pool_bytes, (pss, rss, pool_bytes)
        files = list((tmp_path / "cache" / "data").glob("*/unlabeled_images.npy"))
        assert len(files) == 1 and np.load(files[0], mmap_mode="r").nbytes == pool_bytes
    finally:
        for p in procs:
            p.communicate("\n", timeout=30)


def test_training_on_the_shared_data_gives_the_same_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two FixMatch steps on a CIFAR-10 fixture: the mapped data gives exactly the numbers of the
    data built in the process (batches gathered from the map are the same images)."""
    from raykd.testing import tiny_run_config
    from raykd.train.context import LocalSession
    from raykd.train.loop import train_loop

    monkeypatch.setattr(shared, "MIN_BYTES", 0)
    write_cifar(tmp_path / "cifar", "cifar10")
    cfg = tiny_run_config(
        "fixmatch",
        data={"name": "cifar10", "root": str(tmp_path / "cifar"), "labels_per_class": 2, "val_per_class": 1},
        method={"threshold": 0.105},
        train={"steps": 2, "eval_every": 2, "ema": 0.0, "batch_size": 8, "uratio": 2},
    )
    results = []
    for cache in ("off", str(tmp_path / "cache")):
        monkeypatch.setenv("RAYKD_CACHE", cache)
        run_dir = tmp_path / f"run-{len(results)}"
        metrics = train_loop(cfg, LocalSession(run_dir), run_dir)
        results.append({k: v for k, v in metrics.items() if isinstance(v, float) and k not in ("img_per_s",)})
    assert (tmp_path / "cache" / "data").is_dir()
    assert results[0] == results[1]
