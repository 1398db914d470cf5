"""Lesson `consistency`: consistency distillation (Song et al. 2023; LCM, Luo et al. 2023) of a trained 2-D
teacher into a student that samples in 1-4 steps, against the teacher's 20-step ODE samples."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data.toy2d import sample_toy, sliced_wasserstein
from ..denoisers import Denoiser
from ..samplers import sample_euler, sample_lcm
from ..schedules import exponential_sigmas, karras_sigmas
from ..train.consistency import ConsistencyDistillation
from ..train.fit import fit
from .report import Page, pyplot
from .toys import BATCH, TOY_SCHEDULE, scatter, train_toy

DATA, N, SIGMA_MAX = "eight_gaussians", 2000, 80.0
STUDENT_SIGMAS = {1: [SIGMA_MAX], 2: [SIGMA_MAX, 1.0], 4: [SIGMA_MAX, 2.0, 0.5, 0.1]}


def lcm(f, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """Multistep consistency sampling over the student's levels for `steps` steps."""
    sigmas = torch.tensor(STUDENT_SIGMAS[steps] + [0.0], dtype=torch.float64)
    with torch.no_grad():
        return sample_lcm(f, noise * SIGMA_MAX, sigmas, generator=torch.Generator().manual_seed(3))


def euler(denoiser, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """The teacher's probability-flow ODE with Euler on Karras levels up to SIGMA_MAX."""
    sigmas = torch.cat([karras_sigmas(steps, 0.01, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)])
    with torch.no_grad():
        return sample_euler(denoiser, noise * float(sigmas[0]), sigmas)


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("A teacher diffusion model needs many small ODE steps. A consistency model f(x, sigma) learns to jump "
              "from any point of a teacher ODE path straight to its end. Distillation takes a noised sample "
              "x_{n+1}, makes one teacher ODE step to x^_n, and asks the student to give the same answer at both "
              "points, against a slowly moving (EMA) copy of itself; f(x, sigma_min) = x is built in:")
    page.equation(r"\mathcal{L} = \mathbb{E}\big\|f_\theta(x_{n+1},\sigma_{n+1}) - f_{\theta^-}(\hat x_n, \sigma_n)"
                  r"\big\|^2,\quad \hat x_n = x_{n+1} + (\sigma_n-\sigma_{n+1})\frac{x_{n+1}-D_{teacher}(x_{n+1},"
                  r"\sigma_{n+1})}{\sigma_{n+1}},\quad f = c_{skip}(\sigma)x + c_{out}(\sigma)D_\theta(x,\sigma)")
    page.code("train/consistency.py:ConsistencyDistillation", "train/consistency.py:consistency_function",
              "samplers.py:sample_lcm")
    teacher_net, teacher, _ = train_toy(DATA, desc="teacher")
    student = copy.deepcopy(teacher_net).requires_grad_(True)
    distill = ConsistencyDistillation(teacher, student, lambda net: Denoiser(net, TOY_SCHEDULE, "epsilon"),
                                      exponential_sigmas(40, 0.01, SIGMA_MAX), ema_decay=0.95)
    before = distill.student_function()
    noise = torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
    undistilled = lcm(before, 2, noise)
    g = torch.Generator().manual_seed(4)
    losses = fit(student, lambda step: distill.loss(sample_toy(DATA, BATCH, g), g), 1000, lr=5e-4,
                 desc="distilling", after_step=lambda step: distill.update_target())
    f = distill.student_function()
    data = sample_toy(DATA, N, torch.Generator().manual_seed(99))
    results = {"teacher ODE, 20 Euler steps": euler(teacher, 20, noise)}
    for steps in (1, 2, 4):
        results[f"teacher ODE, {steps} Euler steps"] = euler(teacher, steps, noise)
    for steps in (1, 2, 4):
        results[f"consistency student, {steps} step{'s' * (steps > 1)}"] = lcm(f, steps, noise)
    results["teacher weights as a consistency model (no distillation), 2 steps"] = undistilled
    distances = {name: sliced_wasserstein(x, data) for name, x in results.items()}
    shown = ["teacher ODE, 20 Euler steps", "teacher ODE, 2 Euler steps", "consistency student, 1 step",
             "consistency student, 2 steps", "consistency student, 4 steps"]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 4))
    for ax, name in zip(axes, shown):
        scatter(ax, results[name], f"{name}\nSW {distances[name]:.3f}")
        ax.title.set_fontsize(9)
    axes[-1].plot(losses, lw=0.5)
    axes[-1].set(yscale="log", xlabel="step", title="distillation loss")
    page.figure(fig, "samples", "Teacher with 20 and 2 steps against the distilled student with 1, 2 and 4 steps "
                                "(SW: sliced Wasserstein distance to the data)")
    real = sliced_wasserstein(sample_toy(DATA, N, torch.Generator().manual_seed(7)), data)
    page.table(["samples", "sliced Wasserstein distance to the data"],
               [[name, value] for name, value in distances.items()] + [["a second draw of the data", real]])
    gap = distances["consistency student, 2 steps"] - distances["teacher ODE, 20 Euler steps"]
    page.text(f"The 2-step student is {gap:+.3f} (sliced Wasserstein) from the teacher's 20-step quality; the "
              f"teacher itself at 2 steps is {distances['teacher ODE, 2 Euler steps'] - distances['teacher ODE, 20 Euler steps']:+.3f}.")
    return page.write()
