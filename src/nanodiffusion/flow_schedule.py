"""The rectified-flow schedule with SD3's timestep shift (Esser et al. 2024, sec. 3.1 and 5.3.2), as the sigma list
the samplers walk.

A flow model is trained on x_t = (1 - t) x0 + t eps, t in [0, 1], to predict v = eps - x0. Dividing by (1 - t):
    x = x_t / (1 - t) = x0 + sigma eps,   sigma = t / (1 - t),   t = sigma / (1 + sigma),
the variance-exploding form of every sampler here (Denoiser(prediction="flow") maps back). Euler on these sigmas
is Euler in t: with x0^ = D(x, sigma), eps^ = (x - x0^) / sigma, the step x' = x0^ + sigma' eps^ times (1 - t') is
    x_t' = (1 - t') x0^ + t' eps^ = x_t + (t' - t) v^,   v^ = eps^ - x0^,
exactly diffusers' FlowMatchEulerDiscreteScheduler step.

The steps: `steps` values of t evenly spaced from 1 down to t_min, each moved towards the noise end by the shift
(eq. 23, shift = sqrt(m / n) for m pixels against a base of n; 3.0 for SD3 and SD3.5):
    t' = shift t / (1 + (shift - 1) t),
then 0. As in diffusers, t_min is the shifted last training time, shift(1 / num_train_timesteps).
t = 1 is sigma = inf, where x = x0 + sigma eps has no finite value: `step_from_noise` takes the first step from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import NanoDiffusionError, choice_error

UNSUPPORTED_KEYS = ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas", "shift_terminal", "stochastic_sampling")


def flow_time(sigma: torch.Tensor | float) -> torch.Tensor:
    """t = sigma / (1 + sigma) (1 at sigma = inf), in float64."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
    return torch.where(sigma.isinf(), torch.ones_like(sigma), sigma / (1 + sigma))


@dataclass
class FlowSchedule:
    """The sampling schedule of a rectified-flow model (SD3: shift 3.0, 1000 training timesteps). It answers the
    same calls as schedules.NoiseSchedule does for the samplers (sigmas, prediction_type, with_defaults, ...)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    config: dict | None = field(default=None, repr=False, compare=False)   # the scheduler_config.json read
    prediction_type: str = field(default="flow", init=False)
    timestep_spacing: str = field(default="linspace", init=False)
    clip_sample: bool = field(default=False, init=False)
    final_sigma: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise NanoDiffusionError(f"flow shift {self.shift} is not allowed: use a positive number (SD3: 3.0)")

    @classmethod
    def from_config(cls, config: dict) -> FlowSchedule:
        """From a diffusers FlowMatchEulerDiscreteScheduler scheduler_config.json dict (missing keys: its defaults)."""
        used = [key for key in UNSUPPORTED_KEYS if config.get(key)]
        if used:
            raise NanoDiffusionError(f"flow scheduler setting {used[0]!r} is not supported (SD3 / SD3.5 use a fixed "
                                     f"shift): remove it from scheduler_config.json")
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   shift=float(config.get("shift", 1.0)), config=dict(config))

    def with_defaults(self, defaults: dict) -> FlowSchedule:
        """The same schedule: a flow model's scheduler config is read the same way by every sampler."""
        return self

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        """t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, eq. 23)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def times(self, steps: int) -> torch.Tensor:
        """The `steps + 1` flow times t from 1 down to 0 (diffusers' FlowMatchEulerDiscreteScheduler.sigmas)."""
        if not isinstance(steps, int) or steps < 1:
            raise NanoDiffusionError(f"steps {steps!r} is not allowed: use a whole number from 1 up")
        t_min = float(self.shifted(torch.tensor(1 / self.num_train_timesteps, dtype=torch.float64)))
        t = self.shifted(torch.linspace(1.0, t_min, steps, dtype=torch.float64))
        return torch.cat([t, t.new_zeros(1)])

    def sigmas(self, steps: int, spacing: str = "default", timestep_spacing: str | None = None, *,
               discrete: bool = False, multistep: bool = False) -> torch.Tensor:
        """The `steps + 1` noise levels sigma = t / (1 - t), the first inf (t = 1), the last 0. Every sampler walks
        the same list (timestep_spacing, discrete and multistep are NoiseSchedule's and do not apply)."""
        if spacing != "default":
            raise choice_error("sigma schedule for a flow model", spacing, ["default"])
        return self.t_to_sigma(self.times(steps))

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The network's timestep num_train_timesteps * t for noise level sigma."""
        return self.num_train_timesteps * flow_time(sigma)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma = t / (1 - t) for flow time t in [0, 1] (inf at t = 1)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        return t / (1 - t)


def step_from_noise(denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, sigma_next: float,
                    **cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler's first step from pure noise (t = 1, sigma = inf): (x at sigma_next, x0^).

    D(noise, inf) sees the noise itself (Denoiser's convention at sigma = inf), x0^ = eps - v^, and eps^ = lim
    (x - x0^) / sigma = eps, so the step lands on x = x0^ + sigma_next eps: in flow space x_t' = eps + (t' - 1) v^,
    diffusers' first FlowMatchEuler step. Any sampler then continues from sigma_next.
    """
    x0 = denoiser(noise, math.inf, **cond)
    return x0 + sigma_next * noise, x0
