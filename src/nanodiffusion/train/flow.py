"""Rectified flow (Liu et al. 2023; conditional flow matching, Lipman et al. 2023): train a velocity field on
straight paths from data to noise, x_s = (1 - s) x0 + s eps, regressing u = eps - x0 (their eq. 1).

The trained network is a "flow" prediction for `Denoiser` (denoisers.py): in variance-exploding space
x = x_s / (1 - s) = x0 + sigma eps with sigma = s / (1 - s), so every sampler in samplers.py runs it; Euler on
`flow_sigmas` is exactly Euler in s on dx/ds = u. The network's timestep is num_train_timesteps * s.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..denoisers import append_dims

S_MAX = 0.999   # start of sampling: s = 1 is pure noise, sigma = infinity in VE space


def rectified_flow_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, num_train_timesteps: int = 1000,
                        generator: torch.Generator | None = None, **cond: torch.Tensor) -> torch.Tensor:
    """E_{s ~ U(0,1), eps} || model(x_s, T s) - (eps - x0) ||^2 with x_s = (1 - s) x0 + s eps."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    s = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype).to(x0.device)
    x_s = (1 - append_dims(s, x0.ndim)) * x0 + append_dims(s, x0.ndim) * noise
    velocity = model(x_s, num_train_timesteps * s, **cond)
    return (velocity - (noise - x0)).pow(2).flatten(1).mean(1).mean()


def flow_sigmas(steps: int, s_max: float = S_MAX) -> torch.Tensor:
    """VE noise levels sigma = s / (1 - s) of `steps` equal steps in s from s_max down to 0."""
    s = torch.linspace(s_max, 0, steps + 1, dtype=torch.float64)
    return s / (1 - s)
