"""Any diffusion network as a denoiser D(x, sigma) -> estimate of x0, in variance-exploding space.

Preconditioning of Karras et al. 2022 (eq. 7): D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma)), with
x = x0 + sigma eps. For a network trained on the VP process x_vp = x / sqrt(1 + sigma^2) (c_in below):
    epsilon       F = eps                                 c_skip = 1,              c_out = -sigma
    v_prediction  F = v = alpha eps - sigma_vp x0          c_skip = 1/(sigma^2+1),  c_out = -sigma/sqrt(sigma^2+1)
    sample        F = x0                                  c_skip = 0,              c_out = 1
Rectified flow ("flow", Liu et al. 2023; Esser et al. 2024) trains on x_s = (1 - s) x0 + s eps with target
u = eps - x0. Dividing by (1 - s) gives x = x0 + sigma eps with sigma = s / (1 - s), so s = sigma / (1 + sigma):
    flow          F = u,  c_in = 1/(1+sigma),  c_skip = 1/(1+sigma),  c_out = -sigma/(1+sigma),
and the network's timestep is num_train_timesteps * s (diffusers' FlowMatch convention) instead of sigma_to_t.
A flow model's schedule starts at s = 1, sigma = inf, where x = x0 + sigma eps has no finite value: there D takes
x as the noise eps itself (the limit of x / (1 + sigma)), c_in = c_skip = 1, c_out = -1, so D = eps - u at s = 1
(flow_schedule.step_from_noise takes the first step from it).
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import choice_error
from .flow_schedule import FlowSchedule, flow_time
from .schedules import NoiseSchedule

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample vector (B,) to (B, 1, ..., 1) so it broadcasts against a batch of ndim dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Denoiser:
    """Wrap `model(x_in, t, **cond) -> prediction` as D(x, sigma, **cond) -> x0 (Karras et al. 2022, eq. 7)."""

    def __init__(self, model: Callable[..., torch.Tensor], schedule: NoiseSchedule | FlowSchedule,
                 prediction: str | None = None, round_timesteps: bool = False):
        prediction = prediction or schedule.prediction_type
        if prediction not in PREDICTIONS:
            raise choice_error("prediction type", prediction, list(PREDICTIONS))
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.round_timesteps = round_timesteps   # diffusers' multistep solvers call the net at whole timesteps

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for this prediction type; see the module docstring."""
        if self.prediction == "flow":
            finite = sigma.isfinite()
            c = torch.where(finite, 1 / (1 + sigma), 1.0)
            return c, torch.where(finite, -sigma * c, -1.0), c
        c_in = (sigma**2 + 1) ** -0.5
        if self.prediction == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction == "v_prediction":
            return c_in**2, -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's timestep for noise level sigma."""
        if self.prediction == "flow":
            return self.schedule.num_train_timesteps * flow_time(sigma)
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.round_timesteps else t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in = (append_dims(c.to(x), x.ndim) for c in self.scalings(sigma))
        t = self.timestep(sigma).to(x.device, torch.promote_types(x.dtype, torch.float32))   # no fp16 timesteps
        return c_skip * x + c_out * self.model(x * c_in, t, **cond)
