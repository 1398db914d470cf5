"""Each sampler against the diffusers scheduler it mirrors: same model, same noise -> same trajectory."""

import inspect
import math

import pytest
import torch

from nanodiffusion.samplers import SAMPLERS
from nanodiffusion.schedules import NoiseSchedule
from oracles import require
from samplers_common import denoiser, eps_model, start_noise

diffusers = require("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
STEPS = 8


def run_diffusers(scheduler, x, model, generator=None, **step_options):
    """The diffusers denoising loop: scale input, call the model at each timestep, step."""
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_options["generator"] = generator
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **step_options).prev_sample
    return x


def run_ours(sampler, schedule, steps, x_vp=None, x_ve=None, spacing="default", seed=None, **options):
    """Our sampler from the same start: VP noise (for VP-native samplers) or a VE start; returns VP / VE x."""
    info = SAMPLERS[sampler]
    sigmas = info.sigmas(schedule, steps, spacing)
    x = x_vp * info.initial_noise_scale(sigmas, schedule) if x_vp is not None else x_ve
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = info.fn(denoiser(schedule), x, sigmas, generator=generator, **options)
    return out / math.sqrt(1 + float(sigmas[-1]) ** 2) if x_vp is not None else out


def assert_close(ours, theirs, tol=1e-5):
    assert (ours - theirs).abs().max() <= tol, (ours - theirs).abs().max()
    assert ours.abs().max() > 0.05


@pytest.mark.parametrize("spacing", ["leading", "trailing"])   # diffusers' DDIM steps to t - 1000 // steps,
@pytest.mark.parametrize("eta", [0.0, 0.7])                      # not the next linspace timestep
def test_ddim(spacing, eta):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    scheduler = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(STEPS)
    theirs = run_diffusers(scheduler, start_noise(), eps_model(schedule), torch.Generator().manual_seed(5), eta=eta)
    assert_close(run_ours("ddim", schedule, STEPS, x_vp=start_noise(), seed=5, eta=eta), theirs)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm(spacing):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    scheduler = diffusers.DDPMScheduler(**SD, timestep_spacing=spacing, clip_sample=False)
    scheduler.set_timesteps(STEPS)
    theirs = run_diffusers(scheduler, start_noise(), eps_model(schedule), torch.Generator().manual_seed(3))
    assert_close(run_ours("ddpm", schedule, STEPS, x_vp=start_noise(), seed=3), theirs)


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_plms(steps):
    schedule = NoiseSchedule()
    scheduler = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    theirs = run_diffusers(scheduler, start_noise(), eps_model(schedule))
    assert_close(run_ours("plms", schedule, steps, x_vp=start_noise()), theirs)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_unipc(spacing):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    scheduler = diffusers.UniPCMultistepScheduler(**SD, timestep_spacing=spacing)
    scheduler.set_timesteps(STEPS)
    theirs = run_diffusers(scheduler, start_noise(), eps_model(schedule))
    assert_close(run_ours("unipc", schedule, STEPS, x_vp=start_noise()), theirs)


def test_lcm():
    schedule = NoiseSchedule()
    scheduler = diffusers.LCMScheduler(**SD, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(4)
    theirs = run_diffusers(scheduler, start_noise(), eps_model(schedule), torch.Generator().manual_seed(9))
    assert_close(run_ours("lcm", schedule, 4, x_vp=start_noise(), seed=9), theirs)


K_STYLE = [
    ("euler", diffusers.EulerDiscreteScheduler, {}),
    ("euler_a", diffusers.EulerAncestralDiscreteScheduler, {}),
    ("lms", diffusers.LMSDiscreteScheduler, {}),
    ("heun", diffusers.HeunDiscreteScheduler, {}),
    ("dpm2", diffusers.KDPM2DiscreteScheduler, {}),
    ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    ("dpmpp_2m_sde", diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
]


@pytest.mark.parametrize("sampler,cls,extra", K_STYLE, ids=[k[0] for k in K_STYLE])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_k_style_schedulers(sampler, cls, extra, spacing):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    scheduler = cls(**SD, timestep_spacing=spacing, **extra)
    scheduler.set_timesteps(STEPS)
    dtype = torch.float32 if sampler == "dpmpp_2m_sde" else torch.float64   # diffusers draws its SDE noise in fp32
    x = start_noise().to(dtype) * float(scheduler.init_noise_sigma)
    sigmas = SAMPLERS[sampler].sigmas(schedule, STEPS)
    if cls is diffusers.DPMSolverMultistepScheduler:   # VP-native, multistep spacing: same sigma list, VP start
        sigmas = schedule.sigmas(STEPS, discrete=True, multistep=True)
        assert torch.allclose(scheduler.sigmas.double(), sigmas, atol=1e-5)
    theirs = run_diffusers(scheduler, x, eps_model(schedule), torch.Generator().manual_seed(4))
    x = x * math.sqrt(1 + float(sigmas[0]) ** 2) if cls is diffusers.DPMSolverMultistepScheduler else x
    ours = SAMPLERS[sampler].fn(denoiser(schedule), x, sigmas, generator=torch.Generator().manual_seed(4))
    assert_close(ours.double(), theirs.double())


@pytest.mark.parametrize("sampler,cls", [("euler", diffusers.EulerDiscreteScheduler),
                                         ("lms", diffusers.LMSDiscreteScheduler)])
def test_karras_sigmas(sampler, cls):
    schedule = NoiseSchedule()
    scheduler = cls(**SD, timestep_spacing="linspace", use_karras_sigmas=True,
                    **({"sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max}
                       if cls is diffusers.EulerDiscreteScheduler else {}))
    scheduler.set_timesteps(STEPS)
    x = start_noise() * float(scheduler.init_noise_sigma)
    theirs = run_diffusers(scheduler, x, eps_model(schedule))
    ours = SAMPLERS[sampler].fn(denoiser(schedule), x, SAMPLERS[sampler].sigmas(schedule, STEPS, "karras"))
    assert_close(ours, theirs.double())
