"""Consistency distillation (Song et al. 2023, Alg. 2; LCM, Luo et al. 2023): teach a student to map any point of
a teacher's probability-flow ODE trajectory straight to the trajectory's start, so 1-4 steps sample.

The student is a consistency function f(x, sigma) = c_skip(sigma) x + c_out(sigma) D_student(x, sigma) with
f(x, sigma_min) = x (the boundary condition, their eq. 5). On a grid sigma_1 < ... < sigma_N, a training pair is
x_{n+1} = x0 + sigma_{n+1} z and x^_n, one teacher ODE step (Euler = DDIM, as LCM uses) from it to sigma_n; the
loss d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x^_n, sigma_n)) pulls the student towards its own EMA target
theta- one level lower. It is zero exactly when f is constant along the teacher's discrete trajectories.
Any denoiser works as the teacher (a guided one for LCM: close over the unconditional context) and any network
as the student: `wrap` turns a module into a denoiser (e.g. `lambda net: Denoiser(net, schedule)`).
Sample with `samplers.sample_lcm` over `consistency_function(wrap(student), ...)`. LCM writes the boundary
scalings in timesteps instead (`lcm_scalings`): c_skip vanishes from t = 19 on, so there the student's own
denoiser is its consistency function and `sample_lcm` samples the student network directly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..denoisers import append_dims
from ..schedules import NoiseSchedule
from .ema import EMA

DenoiserFn = Callable[..., torch.Tensor]
Scalings = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]   # sigma -> (c_skip, c_out)
SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def consistency_scalings(sigma: torch.Tensor, sigma_min: float,
                         sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2)
    (Song et al. 2023, app. C): c_skip(sigma_min) = 1, c_out(sigma_min) = 0."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data**2 + sigma**2).sqrt()
    return c_skip, c_out


def lcm_scalings(schedule: NoiseSchedule, timestep_scaling: float = LCM_TIMESTEP_SCALING,
                 sigma_data: float = SIGMA_DATA) -> Scalings:
    """LCM's scalings over the timestep t(sigma) (Luo et al. 2023, sec. 4.1; diffusers' LCMScheduler):
    c_skip = sd^2 / ((k t)^2 + sd^2), c_out = k t / sqrt((k t)^2 + sd^2): c_skip(0) = 1, c_skip(19) < 1e-5."""

    def scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = timestep_scaling * schedule.sigma_to_t(sigma)
        return sigma_data**2 / (t**2 + sigma_data**2), t / (t**2 + sigma_data**2).sqrt()

    return scalings


def consistency_function(denoiser: DenoiserFn, sigma_min: float, sigma_data: float = SIGMA_DATA,
                         scalings: Scalings | None = None) -> DenoiserFn:
    """f(x, sigma) = c_skip x + c_out D(x, sigma): a denoiser with the consistency boundary condition (scalings:
    consistency_scalings at sigma_min by default, or e.g. lcm_scalings)."""
    scalings = scalings or (lambda sigma: consistency_scalings(sigma, sigma_min, sigma_data))

    def f(x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1).expand(x.shape[0])
        c_skip, c_out = (append_dims(c.to(x), x.ndim) for c in scalings(s))
        return c_skip * x + c_out * denoiser(x, s, **cond)

    return f


class ConsistencyDistillation:
    """The consistency-distillation loss for `student` against `teacher` on the increasing grid `sigmas`, and the
    EMA target update to call after every optimiser step (Song et al. 2023, Alg. 2); `scalings` as in
    consistency_function."""

    def __init__(self, teacher: DenoiserFn, student: nn.Module, wrap: Callable[[nn.Module], DenoiserFn],
                 sigmas: torch.Tensor, *, sigma_data: float = SIGMA_DATA, ema_decay: float = 0.95,
                 scalings: Scalings | None = None):
        self.teacher, self.student, self.wrap = teacher, student, wrap
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).sort().values
        self.sigma_data = sigma_data
        self.scalings = scalings
        self.target = EMA(student, ema_decay)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    def student_function(self) -> DenoiserFn:
        """The student's consistency function (sample it with samplers.sample_lcm)."""
        return consistency_function(self.wrap(self.student), self.sigma_min, self.sigma_data, self.scalings)

    def loss(self, x0: torch.Tensor, generator: torch.Generator | None = None, **cond: torch.Tensor) -> torch.Tensor:
        """E || f_theta(x_{n+1}, sigma_{n+1}) - f_theta-(x^_n, sigma_n) ||^2 over n uniform and z ~ N(0, I)."""
        n = torch.randint(0, len(self.sigmas) - 1, (x0.shape[0],), generator=generator)
        low, high = self.sigmas[n], self.sigmas[n + 1]
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_high = x0 + append_dims(high.to(x0), x0.ndim) * z
        with torch.no_grad():
            slope = (x_high - self.teacher(x_high, high, **cond)) / append_dims(high.to(x0), x0.ndim)
            x_low = x_high + append_dims((low - high).to(x0), x0.ndim) * slope   # one Euler (DDIM) step
            target = consistency_function(self.wrap(self.target.model), self.sigma_min, self.sigma_data,
                                          self.scalings)(x_low, low, **cond)
        prediction = self.student_function()(x_high, high, **cond)
        return (prediction - target).pow(2).flatten(1).mean(1).mean()

    def update_target(self) -> None:
        """theta- <- mu theta- + (1 - mu) theta (the EMA target network)."""
        self.target.update(self.student)
