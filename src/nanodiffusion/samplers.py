"""Samplers: plain functions over a denoiser D(x, sigma) -> x0 and a decreasing sigma list ending at 0 (or the
schedule's final sigma), all in variance-exploding space x = x0 + sigma eps (Karras et al. 2022).

Each is `sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x at sigmas[-1]`.
`callback(i, sigma, x, x0_hat)` runs after every step. Noise is drawn on the CPU with `generator` (one
generator, or a list with one per batch row) so a seed gives the same result on every device.
The VP-native samplers (DDPM, DDIM, PLMS, UniPC, LCM) are rewritten in this space: eps = (x - x0) / sigma
and x_vp = x / sqrt(1 + sigma^2), so their results equal diffusers' schedulers step for step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import NanoDiffusionError, choice_error
from .schedules import NoiseSchedule

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None] | None
Generator = torch.Generator | list[torch.Generator] | None


def noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the CPU (per batch row when given a list of generators)."""
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in generator]
        return torch.cat(rows).to(x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def steps(sigmas: torch.Tensor) -> list[tuple[int, float, float]]:
    """(i, sigma_i, sigma_i+1) for every step of a sigma list."""
    s = [float(v) for v in sigmas]
    return [(i, s[i], s[i + 1]) for i in range(len(s) - 1)]


def to_d(x: torch.Tensor, sigma: float, x0: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - x0) / sigma


def check_eta(eta: float) -> None:
    """eta scales the fresh noise of a stochastic step: 0 is deterministic, 1 the full ancestral / SDE amount."""
    if not (math.isfinite(eta) and eta >= 0):
        raise NanoDiffusionError(f"eta {eta} is not allowed: use 0 (deterministic) or more (1 = ancestral / SDE)")


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): split a step into a deterministic part and fresh noise, sigma_down^2 + sigma_up^2 =
    sigma_next^2, sigma_up = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2) (DDIM eq. 16 in VE form)."""
    check_eta(eta)
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                 callback: Callback = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        x = x + to_d(x, s, x0) * (s_next - s)
        if callback:
            callback(i, s, x, x0)
    return x


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                           callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral sampling: Euler step down to sigma_down, then add sigma_up fresh noise (k-diffusion; this is
    DDIM's update, Song et al. 2021 eq. 12, in VE form: x' = x0 + sigma_down eps + sigma_up z)."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        down, up = ancestral_step(s, s_next, eta)
        x = x + to_d(x, s, x0) * (down - s)
        if up > 0:
            x = x + noise_like(x, generator) * s_noise * up
        if callback:
            callback(i, s, x, x0)
    return x


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar') x0 + sqrt(1 - abar' - s_eta^2) eps + s_eta z, which
    divided by sqrt(abar') is the ancestral step above; eta = 0 is the probability-flow Euler step.
    Starts from VP noise (x = noise * sqrt(1 + sigma_0^2)) at a whole timestep, ends at the schedule's final sigma."""
    return sample_euler_ancestral(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta)


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None) -> torch.Tensor:
    """DDPM ancestral sampling with the posterior variance beta~ (Ho et al. 2020, eq. 6-7): DDIM with eta = 1
    (Song et al. 2021, sec. 4.1) over any subsequence of timesteps."""
    return sample_ddim(denoiser, x, sigmas, generator=generator, callback=callback, eta=1.0)


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None) -> torch.Tensor:
    """Heun's 2nd-order method, Euler on the last step to sigma 0 (Karras et al. 2022, Alg. 1)."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        d = to_d(x, s, x0)
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x_2 = x + d * (s_next - s)
            d_2 = to_d(x_2, s_next, denoiser(x_2, s_next))
            x = x + (d + d_2) / 2 * (s_next - s)
        if callback:
            callback(i, s, x, x0)
    return x


def sample_dpm2(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None) -> torch.Tensor:
    """DPM-Solver-2 in sigma: Euler to the geometric midpoint, then the full step with the midpoint slope
    (Lu et al. 2022, Alg. 1 with r = 1/2, as in Karras et al. 2022 / k-diffusion sample_dpm_2)."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        d = to_d(x, s, x0)
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            s_mid = math.sqrt(s * s_next)
            x_2 = x + d * (s_mid - s)
            x = x + to_d(x_2, s_mid, denoiser(x_2, s_mid)) * (s_next - s)
        if callback:
            callback(i, s, x, x0)
    return x


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial that is 1 at sigma_(i-j) and 0 at the
    other nodes sigma_i .. sigma_(i-order+1) (linear multistep; Karras et al. 2022 / k-diffusion sample_lms)."""
    poly = [1.0]   # coefficients in u = tau - sigma_i, lowest degree first
    for k in range(order):
        if k != j:
            node, scale = sigmas[i - k] - sigmas[i], sigmas[i - j] - sigmas[i - k]
            poly = [(low - node * high) / scale for high, low in zip(poly + [0.0], [0.0] + poly)]
    h = sigmas[i + 1] - sigmas[i]
    return sum(c * h ** (n + 1) / (n + 1) for n, c in enumerate(poly))


def sample_lms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
               callback: Callback = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last `order` ODE slopes, with exact coefficients
    for uneven steps (k-diffusion sample_lms; diffusers LMSDiscreteScheduler)."""
    s_list, ds = [float(v) for v in sigmas], []
    for i, s, _ in steps(sigmas):
        x0 = denoiser(x, s)
        ds = [to_d(x, s, x0)] + ds[: order - 1]
        x = x + sum(lms_coefficient(s_list, i, j, len(ds)) * d for j, d in enumerate(ds))
        if callback:
            callback(i, s, x, x0)
    return x


def sample_plms(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                callback: Callback = None) -> torch.Tensor:
    """PLMS / PNDM (Liu et al. 2022, eq. 12-13, with diffusers' skip_prk_steps start): the DDIM transfer step
    (eq. 11, in VE form the Euler step x' = x + (sigma' - sigma) eps) driven by a 4th-order Adams-Bashforth
    combination of past eps; the first step is a 2nd-order improved Euler step (one extra network call)."""
    eps = []
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        e = to_d(x, s, x0)
        if i == 0 and len(sigmas) > 2:
            x_2 = x + e * (s_next - s)
            e_prime = (e + to_d(x_2, s_next, denoiser(x_2, s_next))) / 2
        else:
            e_prime = adams_bashforth(eps[-3:] + [e])
        eps.append(e)
        x = x + e_prime * (s_next - s)
        if callback:
            callback(i, s, x, x0)
    return x


def adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """Equal-step Adams-Bashforth combination of up to 4 slopes, oldest first (PNDM eq. 12)."""
    weights = {1: [1], 2: [-1 / 2, 3 / 2], 3: [5 / 12, -16 / 12, 23 / 12], 4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}
    return sum(w * e for w, e in zip(weights[len(history)], history))


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): multistep 2nd order in lambda = -log sigma, data prediction."""
    x0_prev, h_prev = None, None
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            x0_d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * h_prev)
            x = (s_next / s) * x - math.expm1(-h) * x0_d
            h_prev = h
        x0_prev = x0
        if callback:
            callback(i, s, x, x0)
    return x


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                        callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022b, sec. 5 / app. B; k-diffusion, diffusers
    sde-dpmsolver++): x' = (sigma'/sigma) e^(-eta h) x + (1 - e^(-(1+eta) h)) x0_d + sigma' sqrt(1 - e^(-2 eta h)) z."""
    check_eta(eta)
    x0_prev, h_prev = None, None
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            decay = -math.expm1(-h - eta * h)
            x = (s_next / s) * math.exp(-eta * h) * x + decay * x0
            if x0_prev is not None:
                x = x + 0.5 * decay * (h / h_prev) * (x0 - x0_prev)
            if eta:
                x = x + noise_like(x, generator) * s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
            h_prev = h
        x0_prev = x0
        if callback:
            callback(i, s, x, x0)
    return x


def sample_dpmpp_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                     callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ SDE, 2 stages per step (k-diffusion sample_dpmpp_sde; Lu et al. 2022b): an ancestral
    data-prediction step to lambda + r h, then the full step with the combined x0. The two stages' noises are
    increments of one Brownian path in sigma (W(sigma) - W(s_mid) and W(sigma) - W(sigma')), as k-diffusion's
    Brownian tree gives them; here they are drawn directly: z2 = rho z1 + sqrt(1 - rho^2) z,
    rho = sqrt((sigma - s_mid) / (sigma - sigma'))."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        if s_next == 0:
            x = x + to_d(x, s, x0) * (s_next - s)
        else:
            s_mid = s ** (1 - r) * s_next**r
            down, up = ancestral_step(s, s_mid, eta)
            x_2 = (down / s) * x - math.expm1(math.log(down / s)) * x0
            z_1 = noise_like(x, generator)
            x_2 = x_2 + z_1 * s_noise * up
            x0_2 = denoiser(x_2, s_mid)
            down, up = ancestral_step(s, s_next, eta)
            x0_d = (1 - 1 / (2 * r)) * x0 + 1 / (2 * r) * x0_2
            x = (down / s) * x - math.expm1(math.log(down / s)) * x0_d
            rho = math.sqrt((s - s_mid) / (s - s_next))   # correlation of the two Brownian increments
            z_2 = rho * z_1 + math.sqrt(1 - rho**2) * noise_like(x, generator)
            x = x + z_2 * s_noise * up
        if callback:
            callback(i, s, x, x0)
    return x


def sample_dpmpp_2s_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                              generator: Generator = None, callback: Callback = None, eta: float = 1.0,
                              s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) single-step 2nd order (Lu et al. 2022b, Alg. 1, r = 1/2) to sigma_down, then ancestral
    noise sigma_up (k-diffusion sample_dpmpp_2s_ancestral)."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        down, up = ancestral_step(s, s_next, eta)
        if down == 0:
            x = x + to_d(x, s, x0) * (down - s)
        else:
            s_mid = math.sqrt(s * down)
            x_2 = (s_mid / s) * x - math.expm1(math.log(s_mid / s)) * x0
            x = (down / s) * x - math.expm1(math.log(down / s)) * denoiser(x_2, s_mid)
        if s_next > 0 and up > 0:
            x = x + noise_like(x, generator) * s_noise * up
        if callback:
            callback(i, s, x, x0)
    return x


def unipc_rhos(rks: list[float], h: float) -> torch.Tensor:
    """Solve R rho = b for the UniPC weights with B(h) = e^h - 1 ("bh2"), in data prediction (hh = -h)
    (Zhao et al. 2023, Alg. 1-2): R_kj = r_j^(k-1), b_k = k! phi_(k+1)(hh) / B(hh)."""
    hh = -h
    b, phi, factorial = [], math.expm1(hh) / hh - 1, 1
    for k in range(1, len(rks) + 1):
        b.append(phi * factorial / math.expm1(hh))
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    R = torch.tensor([[r ** (k - 1) for r in rks] for k in range(1, len(rks) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64))


def unipc_update(x: torch.Tensor, s: float, s_next: float, x0: torch.Tensor,
                 terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """x' = (sigma'/sigma) x - (e^(-h) - 1) (x0 + sum_k rho_k D_k), the UniP / UniC update (Zhao et al. 2023,
    eq. 8 with B(h) = e^h - 1, data prediction), in VE form."""
    h = math.log(s / s_next)
    return (s_next / s) * x - math.expm1(-h) * (x0 + sum(rho * d for rho, d in terms))


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                 callback: Callback = None) -> torch.Tensor:
    """UniPC-2 "bh2" (Zhao et al. 2023, Alg. 3; diffusers UniPCMultistepScheduler defaults): a 2nd-order UniP
    predictor step, then after the next network call a UniC corrector re-does that step with the new x0 (no
    extra calls). Lower order on the first and last steps; from VP noise at whole timesteps."""
    sig = [float(v) for v in sigmas]
    n = len(sig) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in sig]
    x0s, x_last, order = [], None, 1
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        if i > 0:   # UniC: correct the previous step with D(x_i) (order `order` of that step)
            h = lam[i] - lam[i - 1]
            m0 = x0s[-1]
            if order == 1:
                terms = [(0.5, x0 - m0)]
            else:
                r1 = (lam[i - 2] - lam[i - 1]) / h
                rhos = unipc_rhos([r1, 1.0], h)
                terms = [(float(rhos[0]), (x0s[-2] - m0) / r1), (float(rhos[1]), x0 - m0)]
            x = unipc_update(x_last, sig[i - 1], s, m0, terms)
        x0s.append(x0)
        order = min(2, n - i, i + 1)
        x_last = x
        if s_next == 0:
            x = x0
        elif order == 1:
            x = unipc_update(x, s, s_next, x0, [])
        else:
            r1 = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
            x = unipc_update(x, s, s_next, x0, [(0.5, (x0s[-2] - x0) / r1)])
        if callback:
            callback(i, s, x, x0)
    return x


def sample_lcm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
               callback: Callback = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; Luo et al. 2023 LCM): jump to x0, re-noise to
    the next level, x' = x0 + sigma' z. The consistency boundary scalings c_skip(t) = 0.25 / ((10 t)^2 + 0.25)
    are left out: at LCM's timesteps (t >= 19) they change x0 by < 1e-5."""
    for i, s, s_next in steps(sigmas):
        x0 = denoiser(x, s)
        x = x0 + noise_like(x0, generator) * s_next if s_next > 0 else x0
        if callback:
            callback(i, s, x, x0)
    return x


def sample_langevin(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generator = None,
                    callback: Callback = None, steps_per_sigma: int = 5, step_scale: float = 0.5) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): at each noise level, x += a/2 score + sqrt(a) z
    with score = (D(x, sigma) - x) / sigma^2 (Tweedie) and a = step_scale sigma^2 (their a_i = eps sigma_i^2 /
    sigma_L^2); the last step to sigma 0 is one denoising jump x = D(x, sigma_L) (Song & Ermon 2020, sec. 4).
    Costs `steps_per_sigma` network calls per step; unadjusted Langevin is biased, more so with fewer steps."""
    for i, s, s_next in steps(sigmas):
        if s_next == 0:
            x0 = x = denoiser(x, s)
        else:
            a = step_scale * s**2
            for _ in range(steps_per_sigma):
                x0 = denoiser(x, s)
                x = x + a / 2 * (x0 - x) / s**2 + math.sqrt(a) * noise_like(x, generator)
        if callback:
            callback(i, s, x, x0)
    return x


LINSPACE = {"timestep_spacing": "linspace"}
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler, its web-UI name, and how the pipeline must set it up."""

    fn: Callable[..., torch.Tensor]
    display_name: str
    stochastic: bool = False
    discrete: bool = False          # VP-native: whole timesteps, starts from VP noise sqrt(1 + sigma_0^2)
    final_alpha: bool = False       # default list ends at the schedule's final sigma (DDIM / PNDM), not 0
    timestep_spacing: str | None = None   # a spacing of its own (LCM), else the schedule's
    multistep: bool = False         # diffusers' multistep spacing (steps + 1 points, last dropped)
    config_defaults: dict = field(default_factory=dict, compare=False)   # its diffusers scheduler's own defaults
    clips_x0: bool = False          # honours the schedule's clip_sample (diffusers' DDIM, DDPM, LCM)

    def schedule(self, schedule: NoiseSchedule) -> NoiseSchedule:
        """The schedule as this sampler's diffusers scheduler reads the model's config: keys the file lacks take
        that scheduler's defaults (schedules.CONFIG_DEFAULTS and config_defaults)."""
        return schedule.with_defaults(self.config_defaults)

    def sigmas(self, schedule: NoiseSchedule, steps: int, spacing: str = "default") -> torch.Tensor:
        """The sigma list this sampler walks for `steps` steps ("default", "karras" or "exponential" spacing)."""
        sigmas = schedule.sigmas(steps, spacing, self.timestep_spacing, discrete=self.discrete,
                                 multistep=self.multistep)
        if self.final_alpha and spacing == "default":
            sigmas[-1] = schedule.final_sigma
        return sigmas

    def initial_noise_scale(self, sigmas: torch.Tensor, schedule: NoiseSchedule) -> float:
        """x_T = noise * this, for every sampler and spacing. sigma_0 (k-diffusion), or sqrt(1 + sigma_0^2), the VE
        image of unit VP noise, where diffusers starts from VP noise: its VP-native samplers (init_noise_sigma = 1)
        and, for the others, a "leading" timestep spacing (their init_noise_sigma = sqrt(1 + sigma_max^2)). A flow
        model's sigma_0 = inf: 1, x is the noise itself (Denoiser's convention there, flow_schedule.step_from_noise)."""
        s0 = float(sigmas[0])
        if math.isinf(s0):
            return 1.0
        vp_start = self.discrete or self.multistep or schedule.timestep_spacing == "leading"
        return math.sqrt(1 + s0**2) if vp_start else s0

    def clipped(self, denoiser: Denoiser, schedule: NoiseSchedule) -> Denoiser:
        """D(x, sigma) clamped to +-clip_sample_range when this sampler honours the schedule's clip_sample (its eps
        then follows from the clamped x0, as diffusers recomputes it); else D itself."""
        if not (self.clips_x0 and schedule.clip_sample):
            return denoiser
        limit = schedule.clip_sample_range

        def clamped(x: torch.Tensor, sigma: float, **cond: torch.Tensor) -> torch.Tensor:
            return denoiser(x, sigma, **cond).clamp(-limit, limit)

        return clamped

    def truncate(self, sigmas: torch.Tensor, start: int) -> torch.Tensor:
        """The tail of the list from step `start` (img2img starts part-way down)."""
        return sigmas[start:]


# config_defaults: the diffusers scheduler each mirrors (DDIM, PNDM, DDPM, Euler, Euler a, LMS, Heun, KDPM2,
# DPM-Solver multistep / SDE, UniPC, LCM); k-diffusion-only samplers take k-diffusion's linspace-like spacing.
SAMPLERS: dict[str, SamplerInfo] = {
    "euler_a": SamplerInfo(sample_euler_ancestral, "Euler a", stochastic=True, config_defaults=LINSPACE),
    "euler": SamplerInfo(sample_euler, "Euler", config_defaults=LINSPACE),
    "lms": SamplerInfo(sample_lms, "LMS", config_defaults=LINSPACE),
    "heun": SamplerInfo(sample_heun, "Heun", config_defaults={**LINSPACE, **SD_BETAS}),
    "dpm2": SamplerInfo(sample_dpm2, "DPM2", config_defaults={**LINSPACE, **SD_BETAS}),
    "dpmpp_2s_a": SamplerInfo(sample_dpmpp_2s_ancestral, "DPM++ 2S a", stochastic=True, config_defaults=LINSPACE),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, "DPM++ 2M", multistep=True, config_defaults=LINSPACE),
    "dpmpp_sde": SamplerInfo(sample_dpmpp_sde, "DPM++ SDE", stochastic=True, config_defaults={**LINSPACE, **SD_BETAS}),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, "DPM++ 2M SDE", stochastic=True, multistep=True,
                                config_defaults=LINSPACE),
    "ddim": SamplerInfo(sample_ddim, "DDIM", discrete=True, final_alpha=True, clips_x0=True),
    "plms": SamplerInfo(sample_plms, "PLMS", discrete=True, final_alpha=True,
                        config_defaults={"set_alpha_to_one": False}),
    "unipc": SamplerInfo(sample_unipc, "UniPC", discrete=True, multistep=True, config_defaults=LINSPACE),
    "ddpm": SamplerInfo(sample_ddpm, "DDPM", stochastic=True, discrete=True, clips_x0=True),
    "lcm": SamplerInfo(sample_lcm, "LCM", stochastic=True, discrete=True, timestep_spacing="lcm", clips_x0=True,
                       config_defaults={"beta_schedule": "scaled_linear", "clip_sample": False, **SD_BETAS}),
    "langevin": SamplerInfo(sample_langevin, "Langevin", stochastic=True, config_defaults=LINSPACE),
}


def get_sampler(name: str) -> SamplerInfo:
    """Look a sampler up by id ("euler_a") or web-UI display name ("Euler a"), case-insensitively."""
    key = str(name).strip().lower()
    for sampler_id, info in SAMPLERS.items():
        if key in (sampler_id, info.display_name.lower()):
            return info
    raise choice_error("sampler", name, [info.display_name for info in SAMPLERS.values()])

