"""Denoising score matching (Vincent 2011; Song & Ermon 2019, eq. 2), the objective of DDPM and NCSN alike.

With x = x0 + sigma eps, the score of the noised data is s(x, sigma) = (D(x, sigma) - x) / sigma^2, so the
weighted DSM loss sigma^2 || s + eps / sigma ||^2 equals || (D(x, sigma) - x0) / sigma ||^2, which for an
eps-predicting network is DDPM's simple loss || eps - eps_theta ||^2 (Ho et al. 2020, eq. 14). The noise
levels decide the model: uniform timesteps of a schedule (DDPM) or log-uniform sigmas (NCSN).
"""

from __future__ import annotations

import math

import torch

from ..denoisers import Denoiser, append_dims
from ..schedules import NoiseSchedule


def dsm_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None,
             **cond: torch.Tensor) -> torch.Tensor:
    """E || (D(x0 + sigma eps, sigma) - x0) / sigma ||^2, averaged over the batch (sigma: one level per row)."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    s = append_dims(sigma.to(x0), x0.ndim)
    x0_hat = denoiser(x0 + s * noise, sigma, **cond)
    return ((x0_hat - x0) / s).pow(2).flatten(1).mean(1).mean()


def schedule_sigmas(schedule: NoiseSchedule, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """sigma_t at n uniformly drawn training timesteps t (DDPM, Ho et al. 2020, Alg. 1)."""
    t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator)
    return schedule.train_sigmas[t]


def log_uniform_sigmas(n: int, sigma_min: float, sigma_max: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """n noise levels log-uniform in [sigma_min, sigma_max] (NCSN's geometric levels, made continuous)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
