"""The library pieces the lessons stand on: classifier guidance, denoising score matching + annealed Langevin,
rectified flow, consistency distillation. Each against an analytic answer on a Gaussian or a point mass."""

from __future__ import annotations

import torch

from nanodiffusion.denoisers import Denoiser
from nanodiffusion.guidance import classifier_guidance
from nanodiffusion.models.mlp import NoiseConditionalMLP
from nanodiffusion.samplers import sample_euler, sample_langevin, sample_lcm
from nanodiffusion.schedules import NoiseSchedule, exponential_sigmas
from nanodiffusion.train.consistency import ConsistencyDistillation, consistency_function
from nanodiffusion.train.fit import fit
from nanodiffusion.train.flow import flow_sigmas, rectified_flow_loss
from nanodiffusion.train.score import dsm_loss, log_uniform_sigmas

MEAN, STD = torch.tensor([1.0, -2.0]), 0.5


def gaussian_denoiser(x: torch.Tensor, sigma, **_) -> torch.Tensor:
    """E[x0 | x0 + sigma eps] for x0 ~ N(MEAN, STD^2 I): Tweedie's formula in closed form."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return MEAN + (x - MEAN) * STD**2 / (STD**2 + s**2)


def test_classifier_guidance_adds_sigma_squared_times_the_log_likelihood_gradient():
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 8), torch.randn(3)

    def classifier(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ weight.T + bias) / (1 + sigma[:, None])

    x, labels, sigma, scale = torch.randn(5, 2, 2, 2), torch.tensor([0, 1, 2, 1, 0]), 1.7, 2.5
    guided = classifier_guidance(gaussian_like := (lambda x, s: 0.3 * x), classifier, labels, scale)
    p = torch.softmax(classifier(x, torch.full((5,), sigma)), dim=-1)
    grad = (weight[labels] - p @ weight) / (1 + sigma)     # d/dx log softmax(Wx + b)_y, by hand
    expected = gaussian_like(x, sigma) + scale * sigma**2 * grad.view_as(x)
    torch.testing.assert_close(guided(x, sigma), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(classifier_guidance(gaussian_like, classifier, labels, 0.0)(x, sigma), 0.3 * x)


def test_annealed_langevin_with_the_analytic_score_reaches_the_gaussian():
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)) * 20
    sigmas = torch.cat([exponential_sigmas(30, 0.01, 20.0), torch.zeros(1)])
    out = sample_langevin(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1),
                          steps_per_sigma=20, step_scale=0.2)
    torch.testing.assert_close(out.mean(0), MEAN, atol=0.05, rtol=0)
    torch.testing.assert_close(out.std(0), torch.full((2,), STD), atol=0.05, rtol=0)
    untrained = sample_langevin(lambda x, s: x * 0, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert (untrained.mean(0) - MEAN).abs().max() > 0.5


def test_dsm_loss_is_the_eps_mse_and_vanishes_at_the_analytic_denoiser():
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    net = NoiseConditionalMLP(hidden=16, depth=1)
    x0, sigma = torch.randn(64, 2), log_uniform_sigmas(64, 0.05, 5.0, torch.Generator().manual_seed(0))
    loss = dsm_loss(Denoiser(net, schedule, "epsilon"), x0, sigma, torch.Generator().manual_seed(2))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x = x0 + sigma[:, None].float() * noise
    eps = net(x / (sigma[:, None].float() ** 2 + 1).sqrt(), schedule.sigma_to_t(sigma).float())
    torch.testing.assert_close(loss, (eps - noise).pow(2).mean(), rtol=1e-4, atol=1e-6)
    point = torch.zeros(8, 2)
    assert dsm_loss(lambda x, s: x * 0, point, torch.ones(8)) == 0


def test_euler_on_flow_sigmas_with_the_analytic_velocity_reaches_the_gaussian():
    schedule = NoiseSchedule()

    def velocity(x_s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t / schedule.num_train_timesteps)[:, None].to(x_s)
        var = (1 - s) ** 2 * STD**2 + s**2
        x0 = MEAN + (1 - s) * STD**2 / var * (x_s - (1 - s) * MEAN)
        return (x_s - x0) / s

    sigmas = flow_sigmas(40)
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = sample_euler(Denoiser(velocity, schedule, "flow"), x, sigmas)
    torch.testing.assert_close(out.mean(0), MEAN, atol=0.04, rtol=0)
    torch.testing.assert_close(out.std(0), torch.full((2,), STD), atol=0.04, rtol=0)


def test_rectified_flow_objective_trains_a_net_that_samples_the_gaussian():
    torch.manual_seed(0)
    schedule, net = NoiseSchedule(), NoiseConditionalMLP(hidden=64, depth=2)
    data = torch.Generator().manual_seed(1)
    fit(net, lambda step: rectified_flow_loss(net, MEAN + STD * torch.randn(128, 2, generator=data),
                                              generator=data), steps=250, lr=5e-3)
    sigmas = flow_sigmas(20)
    with torch.no_grad():
        out = sample_euler(Denoiser(net, schedule, "flow"), torch.randn(2000, 2) * sigmas[0], sigmas)
    torch.testing.assert_close(out.mean(0), MEAN, atol=0.15, rtol=0)
    torch.testing.assert_close(out.std(0), torch.full((2,), STD), atol=0.12, rtol=0)


class ExactConsistency(torch.nn.Module):
    """A 'student' whose consistency function is exactly the teacher's for data at the point C (plus `error`)."""

    def __init__(self, sigma_min: float, error: float = 0.0):
        super().__init__()
        self.error = torch.nn.Parameter(torch.tensor(error))
        self.sigma_min = sigma_min

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        from nanodiffusion.train.consistency import consistency_scalings

        s = sigma.to(x).reshape(-1, 1)
        exact = C + (x - C) * self.sigma_min / s + self.error
        c_skip, c_out = consistency_scalings(s, self.sigma_min)
        return (exact - c_skip * x) / c_out.clamp(min=1e-12)


C = torch.tensor([0.7, -0.3])


def test_consistency_distillation_loss_is_zero_at_its_fixed_point_only():
    sigmas = exponential_sigmas(12, 0.02, 20.0)
    teacher = lambda x, s: C.expand_as(x)   # noqa: E731  (data = the point C: the ODE is x(sigma) = C + sigma k)
    x0 = C.expand(256, 2)
    exact = ConsistencyDistillation(teacher, ExactConsistency(0.02), lambda m: m.denoiser, sigmas)
    assert exact.loss(x0, torch.Generator().manual_seed(0)) < 1e-10
    off = ConsistencyDistillation(teacher, ExactConsistency(0.02, 0.1), lambda m: m.denoiser, sigmas)
    off.target.model.error.data.fill_(0.0)
    assert off.loss(x0, torch.Generator().manual_seed(0)) > 1e-3
    f = consistency_function(lambda x, s: x * 0 + 5, 0.02)
    x = torch.randn(4, 2)
    torch.testing.assert_close(f(x, 0.02), x)     # boundary condition f(x, sigma_min) = x


def test_consistency_distillation_trains_a_one_step_student_of_a_gaussian_teacher():
    torch.manual_seed(0)
    schedule, student = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02), NoiseConditionalMLP(hidden=64, depth=2)
    sigmas = exponential_sigmas(20, 0.02, 20.0)
    distill = ConsistencyDistillation(gaussian_denoiser, student, lambda m: Denoiser(m, schedule, "sample"), sigmas)
    data = torch.Generator().manual_seed(1)
    fit(student, lambda step: distill.loss(MEAN + STD * torch.randn(256, 2, generator=data), data), steps=300,
        lr=3e-3, after_step=lambda step: distill.update_target())
    with torch.no_grad():
        out = sample_lcm(distill.student_function(), torch.randn(2000, 2) * 20.0, torch.tensor([20.0, 0.0]))
    torch.testing.assert_close(out.mean(0), MEAN, atol=0.2, rtol=0)
    assert (out.std(0) - STD).abs().max() < 0.2
