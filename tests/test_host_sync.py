"""No host synchronisation between evaluations: the loop's steps (batch, method step, backward, SGD,
EMA, log window) never read a value back from the device, never make an output whose shape depends
on the data and never copy to the device blocking.  On a GPU each of these stalls the host until the
device has drained its queue, once per step.

The check runs on CPU with :class:`raykd.testing.HostSyncCounter` (a ``TorchFunctionMode``): it flags
the calls that *would* synchronise on CUDA (``.item()``, ``bool()``, ``.tolist()``, ``nonzero``,
boolean-mask indexing, ``bincount``, ``.to(device)`` without ``non_blocking``, ...).
"""

from __future__ import annotations

from functools import partialmethod

import pytest
import torch

from raykd.config import parse_run_config
from raykd.data.augment import Augmenter
from raykd.registry import METHODS
from raykd.testing import HostSyncCounter, tiny_run_config, tiny_teacher
from raykd.train import loop
from raykd.train.context import LocalSession

#: the method configurations whose steps still synchronise, and why (documented in docs/benchmarks.md);
#: none since LayerMatch's bank update became shape-static
KNOWN: dict[tuple[str, str | None], set[str]] = {}
CASES = [(m, {}) for m in METHODS.names()]
CASES += [("layermatch", {"avg_mode": mode}) for mode in ("sample_ema", "feature_center", "center_ema", "ema_model")]


def _steps_under(counter: HostSyncCounter, monkeypatch) -> None:
    """Run the loop's per-step phases (not the evaluations) under ``counter``, from the second step
    on: the first one makes the run's device constants once (normalisation, op ids), as a warm-up."""
    seen = {"step": -1}

    def counting(fn):
        def counted(*args, **kwargs):
            if seen["step"] < 1:
                return fn(*args, **kwargs)
            with counter:
                return fn(*args, **kwargs)

        return counted

    real_batch = loop._batch

    def batch(run, step, *rest):
        seen["step"] = step
        return counting(real_batch)(run, step, *rest)

    monkeypatch.setattr(loop, "_batch", batch)
    monkeypatch.setattr(loop, "train_one_step", counting(loop.train_one_step))
    monkeypatch.setattr(loop._LogWindow, "add", counting(loop._LogWindow.add))
    # the augmentation as it runs on CUDA (on CPU it sorts the batch by op, which reads counts back)
    monkeypatch.setattr(Augmenter, "__init__", partialmethod(Augmenter.__init__, sync_free=True))


def _open_set_config(method: str, knobs: dict):
    raw = tiny_run_config(method, method=knobs, train={"steps": 4, "eval_every": 4}).model_dump(
        mode="json", exclude={"provenance"}
    )
    raw["data"]["open_set"] = {"unseen_classes": [9]}  # the paths that read hidden labels too
    if raw.get("teacher"):
        raw["teacher"]["run"]["data"]["open_set"] = {"unseen_classes": [9]}
    return parse_run_config(raw)


@pytest.mark.parametrize("method, knobs", CASES, ids=[m + "".join(f"-{v}" for v in k.values()) for m, k in CASES])
def test_train_steps_between_evaluations_do_not_sync(method, knobs, tmp_path, monkeypatch):
    cfg = _open_set_config(method, knobs)
    teacher = tiny_teacher(cfg, tmp_path / "t")
    counter = HostSyncCounter()
    _steps_under(counter, monkeypatch)
    loop.train_loop(cfg, LocalSession(tmp_path / "run"), tmp_path / "run", teacher_dir=teacher)
    allowed = KNOWN.get((method, getattr(cfg.method, "avg_mode", None)), set())
    unexpected = sorted({hit for hit in counter.hits if hit[0] not in allowed})
    assert not unexpected, f"{method}: host syncs in the steps: {unexpected}"


def test_the_counter_sees_what_syncs():
    x = torch.arange(6.0)
    counter = HostSyncCounter()
    with counter:
        x.sum().item()
        bool(x[0] > 1)
        x[x > 2].sum()
        x.to(torch.device("cpu"))
        x.to(torch.device("cpu"), non_blocking=True)  # not counted
        x.to(torch.float64)  # not counted
        torch.tensor([1.0], device="cpu")
        torch.bincount(x.long()).tolist()
    reasons = [r for r, _ in counter.hits]
    assert reasons == ["item", "__bool__", "__getitem__ with a boolean mask", "blocking .to()",
                       "torch.tensor(host data, device=...)", "bincount", "tolist"]  # fmt: skip
    assert all(where.startswith("tests/test_host_sync.py:") for _, where in counter.hits)
