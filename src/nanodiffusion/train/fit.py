"""A plain in-memory training loop for the lessons' toy models: Adam on a loss closure, with a progress bar."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


def fit(model: nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float = 1e-3,
        desc: str = "training", after_step: Callable[[int], None] | None = None) -> list[float]:
    """Minimise loss_fn(step) over model's parameters for `steps` Adam steps (cosine-decayed lr); the losses."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.05)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
    model.eval()
    return losses
