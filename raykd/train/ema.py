"""Exponential moving average of the student, the model evaluated by default."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """EMA copy of a model: ``θ_ema ← d·θ_ema + (1 − d)·θ`` after each step; buffers (BN statistics)
    are copied.

    The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` so that short runs evaluate a model
    that has actually moved away from its initialisation (with d = 0.999 and no warm-up, a 500-step
    run would still be 60 % random initial weights).  At the FixMatch scale (2^20 steps) the warm-up
    is irrelevant.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
