"""Shared fixtures for the sampler tests: an analytic eps-model on a known schedule."""

import torch

from nanodiffusion.denoisers import Denoiser
from nanodiffusion.schedules import NoiseSchedule

SHAPE = (2, 3, 4, 4)
MU, STD = 0.3, 0.5   # Gaussian data x0 ~ N(MU, STD^2) per element


def eps_model(schedule: NoiseSchedule):
    """eps(x_vp, t): the exact eps of Gaussian data plus a fixed nonlinear term in (x, t), as a network sees it."""

    def model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_in.shape[0])
        sigma = schedule.t_to_sigma(t).reshape(-1, 1, 1, 1).to(x_in)
        x = x_in * (1 + sigma**2).sqrt()
        exact = sigma / (STD**2 + sigma**2) * (x - MU)
        return exact + 0.1 * torch.tanh(x_in) * torch.cos(t / 300).reshape(-1, 1, 1, 1).to(x_in)

    return model


def denoiser(schedule: NoiseSchedule) -> Denoiser:
    return Denoiser(eps_model(schedule), schedule, "epsilon")


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
