"""Noise schedules against diffusers' schedulers and k-diffusion's sigma lists."""

import numpy as np
import pytest
import torch

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.samplers import SAMPLERS
from nanodiffusion.schedules import NoiseSchedule
from oracles import k_sampling, require

diffusers = require("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)


def close(ours, theirs, tol=1e-5):
    theirs = torch.as_tensor(np.array(theirs.tolist() if torch.is_tensor(theirs) else theirs, dtype=np.float64))
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert (ours.double() - theirs).abs().max() <= tol


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_and_alphas_cumprod_match_diffusers(name, zero_snr):
    ours = NoiseSchedule(name, beta_start=0.0001, beta_end=0.02, rescale_zero_terminal_snr=zero_snr)
    theirs = diffusers.EulerDiscreteScheduler(beta_schedule=name, beta_start=0.0001, beta_end=0.02,
                                              rescale_betas_zero_snr=zero_snr)
    close(ours.betas, theirs.betas)
    close(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert torch.allclose(ours.train_sigmas**2, (1 - ours.alphas_cumprod) / ours.alphas_cumprod, rtol=1e-12)
    assert torch.allclose(ours.snr(torch.arange(1000.0)), ours.alphas_cumprod / (1 - ours.alphas_cumprod), rtol=1e-9)


def test_zero_terminal_snr_rescale():
    ddim = diffusers.DDIMScheduler(**SD, rescale_betas_zero_snr=True)
    ours = NoiseSchedule(rescale_zero_terminal_snr=True)
    close(ours.betas, ddim.betas)
    assert float(ddim.alphas_cumprod[-1]) == 0.0 and ours.sigma_max == pytest.approx(2**12, rel=1e-6)
    assert float(ours.alphas_cumprod[0]) == pytest.approx(float(NoiseSchedule().alphas_cumprod[0]), rel=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 7, 10, 25, 50])
def test_timesteps_match_diffusers(spacing, steps):
    ours = NoiseSchedule(timestep_spacing=spacing)
    for cls in (diffusers.DDIMScheduler, diffusers.PNDMScheduler, diffusers.EulerDiscreteScheduler):
        pndm = {"skip_prk_steps": True} if cls is diffusers.PNDMScheduler else {}
        theirs = cls(**SD, timestep_spacing=spacing, **pndm)
        theirs.set_timesteps(steps)
        t = ours.timesteps(steps)
        expected = theirs._timesteps[::-1] if cls is diffusers.PNDMScheduler else theirs.timesteps
        close(t if cls is diffusers.EulerDiscreteScheduler else t.round(), expected, tol=1e-4)
    unipc = diffusers.UniPCMultistepScheduler(**SD, timestep_spacing=spacing)
    unipc.set_timesteps(steps)
    close(ours.sigmas(steps, discrete=True, multistep=True), unipc.sigmas)
    close(ours.sigma_to_t(ours.sigmas(steps, discrete=True, multistep=True)[:-1]), unipc.timesteps, tol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 8, 50])
def test_lcm_timesteps_match_diffusers(steps):
    theirs = diffusers.LCMScheduler(**SD)
    theirs.set_timesteps(steps)
    close(NoiseSchedule().timesteps(steps, "lcm"), theirs.timesteps)
    with pytest.raises(NanoDiffusionError, match="at most 50"):
        NoiseSchedule().timesteps(51, "lcm")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_default_sigmas_match_diffusers_euler(spacing):
    theirs = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing)
    theirs.set_timesteps(12)
    close(NoiseSchedule(timestep_spacing=spacing).sigmas(12), theirs.sigmas)


def test_karras_and_exponential_sigmas_match_k_diffusion_and_diffusers():
    k = k_sampling()
    ours = NoiseSchedule()
    close(ours.sigmas(15, "karras"), k.get_sigmas_karras(15, ours.sigma_min, ours.sigma_max).double())
    close(ours.sigmas(15, "exponential"), k.get_sigmas_exponential(15, ours.sigma_min, ours.sigma_max).double())
    for option, spacing in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")):
        theirs = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace", **{option: True},
                                                  sigma_min=ours.sigma_min, sigma_max=ours.sigma_max)
        theirs.set_timesteps(15)
        close(ours.sigmas(15, spacing), theirs.sigmas)


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma():
    ours = NoiseSchedule()
    theirs = diffusers.EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(((1 - theirs.alphas_cumprod.numpy()) / theirs.alphas_cumprod.numpy()) ** 0.5)
    sigmas = ours.sigmas(20, "karras")[:-1]
    expected = np.array([theirs._sigma_to_t(s, log_sigmas) for s in sigmas.float().numpy()])
    close(ours.sigma_to_t(sigmas), expected, tol=2e-3)   # theirs interpolates float32 log sigmas
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(ours.sigma_to_t(ours.t_to_sigma(t)), t, atol=1e-9)
    assert ours.sigma_to_t(torch.tensor([[1.0, 2.0]])).shape == (1, 2)


def test_final_sigma_and_from_config():
    config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
              "skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    ours = NoiseSchedule.from_config(config)
    assert (ours.timestep_spacing, ours.steps_offset, ours.prediction_type) == ("trailing", 1, "v_prediction")
    assert torch.equal(ours.alphas_cumprod, NoiseSchedule().alphas_cumprod)
    assert ours.final_sigma == ours.sigma_min > 0
    assert NoiseSchedule.from_config({}).beta_schedule == "linear" and NoiseSchedule.from_config({}).final_sigma == 0
    ddim = SAMPLERS["ddim"].sigmas(ours, 10)
    assert ddim[-1] == ours.sigma_min and SAMPLERS["euler"].sigmas(ours, 10)[-1] == 0


def test_missing_keys_take_each_samplers_diffusers_defaults():
    """A published SD config has no timestep_spacing: Euler reads it as "linspace", DDIM as "leading"; a config
    without betas gives Heun / LCM their own defaults. Keys the file has always win; code-made schedules stay."""
    sd15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
            "set_alpha_to_one": False, "trained_betas": None}
    ours = NoiseSchedule.from_config(sd15)
    assert ours.timestep_spacing == "leading" and ours.with_defaults({}).timestep_spacing == "leading"
    assert SAMPLERS["euler"].schedule(ours).timestep_spacing == "linspace"
    assert SAMPLERS["plms"].schedule(ours).timestep_spacing == "leading"
    assert SAMPLERS["euler"].schedule(NoiseSchedule.from_config({**sd15, "timestep_spacing": "trailing"})
                                      ).timestep_spacing == "trailing"
    assert SAMPLERS["ddim"].schedule(NoiseSchedule.from_config({})).set_alpha_to_one
    assert not SAMPLERS["plms"].schedule(NoiseSchedule.from_config({})).set_alpha_to_one
    assert SAMPLERS["heun"].schedule(NoiseSchedule.from_config({})).beta_end == 0.012
    assert SAMPLERS["lcm"].schedule(NoiseSchedule.from_config({})).beta_schedule == "scaled_linear"
    assert SAMPLERS["euler"].schedule(NoiseSchedule()).timestep_spacing == "leading"
    # clip_sample: DDIM / DDPM default to clamping x0 to [-1, 1], LCM does not, Euler has no such key
    bare = NoiseSchedule.from_config({"beta_schedule": "scaled_linear"})
    wild = lambda x, sigma: 3 * x   # noqa: E731
    x = torch.full((1, 2), 2.0)
    assert SAMPLERS["ddim"].clipped(wild, SAMPLERS["ddim"].schedule(bare))(x, 1.0).max() == 1.0
    assert SAMPLERS["lcm"].clipped(wild, SAMPLERS["lcm"].schedule(bare))(x, 1.0).max() == 6.0
    assert SAMPLERS["euler"].clipped(wild, SAMPLERS["euler"].schedule(bare)) is wild
    assert not SAMPLERS["ddim"].schedule(NoiseSchedule.from_config({**sd15, "clip_sample": False})).clip_sample


def test_bad_names_and_steps_raise_clear_errors():
    with pytest.raises(NanoDiffusionError, match="unknown beta schedule 'cosine'.*scaled_linear"):
        NoiseSchedule("cosine")
    with pytest.raises(NanoDiffusionError, match="unknown timestep spacing 'even'.*leading"):
        NoiseSchedule(timestep_spacing="even")
    with pytest.raises(NanoDiffusionError, match="unknown sigma schedule 'polynomial'.*karras"):
        NoiseSchedule().sigmas(10, "polynomial")
    for steps in (0, -3, 1001, 2.5):
        with pytest.raises(NanoDiffusionError, match=f"steps {steps} is not allowed"):
            NoiseSchedule().sigmas(steps)
    with pytest.raises(NanoDiffusionError, match="steps 0 is not allowed"):
        NoiseSchedule().sigmas(0, "karras")
    assert len(NoiseSchedule().sigmas(2000, "karras")) == 2001
