"""Noise schedules: betas -> alpha_bar -> sigma, the sigma <-> timestep map, and the sigma lists samplers walk.

Forward process (Ho et al. 2020, eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Dividing by sqrt(abar_t)
gives the variance-exploding form every sampler here works in (Karras et al. 2022, sec. 2):
    x = x0 + sigma eps,   sigma_t = sqrt((1 - abar_t) / abar_t),   SNR_t = abar_t / (1 - abar_t) = 1 / sigma_t^2.
Timestep spacings and sigma lists follow diffusers and k-diffusion exactly, so a seed gives the same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import NanoDiffusionError, choice_error

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "lcm")
SIGMA_SPACINGS = ("default", "karras", "exponential")
ZERO_SNR_ALPHA_BAR = 2.0**-24   # diffusers' stand-in for abar_T = 0, so sigma_max stays finite (~4096)
LCM_ORIGINAL_STEPS = 50
# diffusers' DDIMScheduler defaults for the keys a scheduler_config.json may lack (published SD 1.x / 2.x configs
# have no "timestep_spacing"); samplers whose diffusers scheduler defaults differently say so in SamplerInfo.
CONFIG_DEFAULTS = {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                   "rescale_betas_zero_snr": False, "timestep_spacing": "leading", "steps_offset": 0,
                   "set_alpha_to_one": True, "prediction_type": "epsilon", "clip_sample": True,
                   "clip_sample_range": 1.0}


def linear_betas(beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def scaled_linear_betas(beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    """Latent diffusion's schedule: linear in sqrt(beta) (Rombach et al. 2022; "scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last step has SNR 0 and the first is unchanged (Lin et al. 2023, Alg. 1)."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma (k-diffusion get_sigmas_exponential)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def check_steps(steps: int, limit: int | None = None) -> None:
    """steps must be a whole number from 1 (to the number of training timesteps, for timestep spacings)."""
    if not isinstance(steps, int) or steps < 1 or limit is not None and steps > limit:
        upto = f" to {limit}" if limit is not None else " up"
        raise NanoDiffusionError(f"steps {steps!r} is not allowed: use a whole number from 1{upto}")


@dataclass
class NoiseSchedule:
    """A discrete diffusion schedule (defaults: Stable Diffusion's scaled-linear 0.00085 -> 0.012, 1000 steps)."""

    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_zero_terminal_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    clip_sample: bool = False          # DDIM / DDPM / LCM clamp x0 to +-clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0
    config: dict | None = field(default=None, repr=False, compare=False)   # the scheduler_config.json read
    betas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise choice_error("beta schedule", self.beta_schedule, list(BETA_SCHEDULES))
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise choice_error("timestep spacing", self.timestep_spacing, list(TIMESTEP_SPACINGS))
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = linear_betas(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(self.beta_start, self.beta_end, n)
        else:
            betas = cosine_betas(n)
        if self.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        if self.rescale_zero_terminal_snr:
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR

    @classmethod
    def from_config(cls, config: dict, defaults: dict | None = None) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict. A key it lacks (or sets to null) takes the value diffusers'
        scheduler would default to: `defaults` (that scheduler's own), else CONFIG_DEFAULTS (DDIMScheduler's)."""
        given = {key: value for key, value in config.items() if value is not None}
        c = {**CONFIG_DEFAULTS, **(defaults or {}), **given}
        return cls(
            beta_schedule=c["beta_schedule"], num_train_timesteps=c["num_train_timesteps"],
            beta_start=c["beta_start"], beta_end=c["beta_end"], rescale_zero_terminal_snr=c["rescale_betas_zero_snr"],
            timestep_spacing=c["timestep_spacing"], steps_offset=c["steps_offset"],
            set_alpha_to_one=c["set_alpha_to_one"], prediction_type=c["prediction_type"],
            clip_sample=c["clip_sample"], clip_sample_range=c["clip_sample_range"], config=dict(config),
        )

    def with_defaults(self, defaults: dict) -> "NoiseSchedule":
        """This schedule as a sampler whose diffusers scheduler defaults to `defaults` reads the same config file
        (e.g. Euler's "linspace" spacing where the file has no timestep_spacing); unchanged when made in code."""
        return self if self.config is None else NoiseSchedule.from_config(self.config, defaults)

    @property
    def train_sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) at every training timestep t = 0 .. T-1 (increasing)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.train_sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    @property
    def final_sigma(self) -> float:
        """Where DDIM / PLMS land after their last step: abar = 1 (sigma 0) or abar_0 when set_alpha_to_one is off."""
        return 0.0 if self.set_alpha_to_one else self.sigma_min

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) = 1 / sigma^2 at (fractional) timestep t."""
        return self.t_to_sigma(t) ** -2

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep by linear interpolation in log sigma (k-diffusion DiscreteSchedule.sigma_to_t)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        log_sigma = sigma.clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma at fractional timestep t, interpolating log sigma between neighbouring timesteps."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def timesteps(self, steps: int, spacing: str | None = None) -> torch.Tensor:
        """`steps` decreasing timesteps, spaced as diffusers' DDIM/Euler schedulers define "leading", "trailing",
        "linspace" (fractional; round for discrete samplers) and LCMScheduler defines its skipping schedule."""
        spacing = spacing or self.timestep_spacing
        n = self.num_train_timesteps
        check_steps(steps, n)
        if spacing == "leading":
            return torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (n // steps) + self.steps_offset
        if spacing == "trailing":
            return (n - torch.arange(steps, dtype=torch.float64) * (n / steps)).round() - 1
        if spacing == "linspace":
            return torch.linspace(0, n - 1, steps, dtype=torch.float64).flip(0)
        if spacing == "lcm":
            return lcm_timesteps(steps, n)
        raise choice_error("timestep spacing", spacing, list(TIMESTEP_SPACINGS))

    def sigmas(self, steps: int, spacing: str = "default", timestep_spacing: str | None = None, *,
               discrete: bool = False, multistep: bool = False) -> torch.Tensor:
        """The `steps + 1` noise levels a sampler walks, ending in 0 (k-diffusion's sigma list).

        spacing "default": sigma at the spaced timesteps (rounded to whole timesteps when `discrete` or `multistep`,
        as diffusers' DDPM / DDIM / PNDM / UniPC / LCM / DPM-Solver do); "karras" (rho = 7) and "exponential" span
        [sigma_min, sigma_max] of the schedule. `multistep` spaces steps + 1 timesteps and drops the last,
        as diffusers' multistep solvers (UniPC, DPM-Solver) do for "leading" and "linspace".
        """
        check_steps(steps)
        if spacing == "karras":
            sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max)
        elif spacing == "exponential":
            sigmas = exponential_sigmas(steps, self.sigma_min, self.sigma_max)
        elif spacing == "default":
            timestep_spacing = timestep_spacing or self.timestep_spacing
            if multistep and timestep_spacing in ("leading", "linspace") and steps < self.num_train_timesteps:
                t = self.timesteps(steps + 1, timestep_spacing)[:-1]
            else:
                t = self.timesteps(steps, timestep_spacing)
            sigmas = self.t_to_sigma(t.round() if discrete or multistep else t)
        else:
            raise choice_error("sigma schedule", spacing, list(SIGMA_SPACINGS))
        return torch.cat([sigmas, sigmas.new_zeros(1)])


def lcm_timesteps(steps: int, n: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """LCM's schedule: every (n / original_steps)-th timestep of the distillation grid, `steps` of them evenly
    picked from the top (Luo et al. 2023, sec. 4.3; diffusers LCMScheduler)."""
    if steps > original_steps:
        raise NanoDiffusionError(f"LCM takes at most {original_steps} steps, not {steps}: lower --steps")
    grid = torch.arange(original_steps, 0, -1, dtype=torch.float64) * (n // original_steps) - 1
    picks = (torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).floor().long()
    return grid[picks]
