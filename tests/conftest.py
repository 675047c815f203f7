"""Shared fixtures.  Tests run on CPU; Ray tests share one local Ray instance."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# decoded image folders go to a throwaway cache, not the user's ~/.cache/raykd
os.environ.setdefault("RAYKD_CACHE", os.path.join(tempfile.gettempdir(), f"raykd-test-cache-{os.getuid()}"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 3 logical CPUs (2 train workers + slack), no dashboard, quiet."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
