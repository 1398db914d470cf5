"""Exponential moving average of the weights (Polyak averaging), the copy that gets shipped."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, decay: float) -> float:
    """Warm-up of the decay, min(decay, (1 + step) / (10 + step)), so early averages forget the init."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """theta_ema <- d * theta_ema + (1 - d) * theta after every optimizer step; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the current weights of `model`."""
        d = ema_decay(self.step, self.decay)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.step += 1

    def state_dict(self) -> dict:
        """Weights and step, for checkpoints."""
        return {"model": self.model.state_dict(), "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
        self.decay = float(state["decay"])
