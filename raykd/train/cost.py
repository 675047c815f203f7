"""What the evaluated model costs: its parameters, its multiply-accumulates per image and its latency.

Measured once per training process, at the first evaluation, on the model the loop evaluates (the
EMA copy, or the raw student with ``train.ema: 0``) through the method's ``predict``, so a multi-exit
student counts every exit its prediction runs.  None of it touches the weights, the optimiser or any
random generator: training is the same with or without it.

* ``params``: the parameters of every module that runs during one ``predict`` (each counted once;
  a module the prediction never calls, such as a training-only head, is not counted).
* ``macs``: multiply-accumulates of one image through ``predict``, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; batch norm,
  activations and pooling are not counted), as FLOPs / 2.
* ``latency_ms``: the median wall time of ``predict`` on one image (batch 1) on the run's device,
  after warm-up (:data:`WARMUP` calls, then :data:`REPEATS` timed ones; CUDA is synchronised).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: the cost metrics each run reports
COST_METRICS = ("params", "macs", "latency_ms")
WARMUP = 2
REPEATS = 10


def used_parameters(model: nn.Module, forward: Callable[[], Any]) -> int:
    """Parameters (numel) of the modules of ``model`` that run during ``forward()``, each once."""
    seen: dict[int, nn.Parameter] = {}

    def hook(module: nn.Module, _args: Any) -> None:
        seen.update({id(p): p for p in module.parameters(recurse=False)})

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return sum(p.numel() for p in seen.values())


def count_macs(forward: Callable[[], Any]) -> int:
    """Multiply-accumulates of ``forward()``: FlopCounterMode's FLOPs / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    return int(counter.get_total_flops()) // 2


def median_latency_ms(forward: Callable[[], Any], device: torch.device, warmup: int = WARMUP,
                      repeats: int = REPEATS) -> float:  # fmt: skip
    """Median wall time of ``forward()`` in milliseconds (CUDA synchronised around each call)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            forward()
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def model_cost(model: nn.Module, predict: Callable[[nn.Module, torch.Tensor], Any], x: torch.Tensor,
               autocast: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """``params``, ``macs`` and ``latency_ms`` of ``predict(model, x)`` for one image ``x`` (a batch of
    1, already normalised and on the device); ``autocast`` is the run's autocast context (latency only)."""
    was_training = model.training
    model.eval()
    try:
        params = used_parameters(model, lambda: predict(model, x))
        macs = count_macs(lambda: predict(model, x))

        def timed() -> Any:
            if autocast is None:
                return predict(model, x)
            with autocast():
                return predict(model, x)

        latency = median_latency_ms(timed, x.device)
    finally:
        model.train(was_training)
    return {"params": params, "macs": macs, "latency_ms": latency}
