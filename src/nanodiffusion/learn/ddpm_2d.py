"""Lesson `ddpm-2d`: DDPM (Ho et al. 2020) on a 2-D toy: training loss, ancestral sampling trajectories."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.toy2d import sample_toy, sliced_wasserstein
from ..samplers import get_sampler
from .report import Page, pyplot
from .toys import TOY_SCHEDULE, figure_image, scatter, train_toy

DATA, STEPS, N = "eight_gaussians", 100, 2000


def sample(denoiser, steps: int, seed: int, record: list | None = None) -> torch.Tensor:
    """DDPM ancestral samples from seeded noise; `record` collects x after every step."""
    ddpm = get_sampler("ddpm")
    sigmas = ddpm.sigmas(TOY_SCHEDULE, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, generator=g) * ddpm.initial_noise_scale(sigmas, TOY_SCHEDULE)
    if record is not None:
        record.append(x / (1 + sigmas[0] ** 2) ** 0.5)
    callback = None if record is None else (
        lambda i, s, x, x0: record.append(x / (1 + float(sigmas[i + 1]) ** 2) ** 0.5))
    with torch.no_grad():
        return ddpm.fn(denoiser, x, sigmas, generator=g, callback=callback)


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("A small MLP learns to predict the noise that was added to points of a 2-D distribution (eight "
              "Gaussians), at every noise level of the DDPM schedule. Sampling starts from pure noise and walks "
              "back one step at a time, adding fresh noise at each step (ancestral sampling):")
    page.equation(r"L = \mathbb{E}_{t,x_0,\epsilon}\left\|\epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t}x_0 + "
                  r"\sqrt{1-\bar\alpha_t}\epsilon, t)\right\|^2,\qquad x_{t-1} = \tfrac{1}{\sqrt{\alpha_t}}\Big(x_t - "
                  r"\tfrac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon_\theta\Big) + \tilde\beta_t^{1/2} z")
    page.code("train/score.py:dsm_loss", "models/mlp.py:NoiseConditionalMLP", "samplers.py:sample_ddpm")
    untrained = train_toy(DATA, steps=0)[1]
    net, denoiser, losses = train_toy(DATA)
    data = sample_toy(DATA, N, torch.Generator().manual_seed(99))
    path: list[torch.Tensor] = []
    samples = sample(denoiser, STEPS, seed=1, record=path)
    baseline = sample(untrained, STEPS, seed=1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].plot(losses, lw=0.5, alpha=0.5)
    axes[0].plot(torch.tensor(losses).unfold(0, 50, 1).mean(1), lw=1.5)
    axes[0].set(yscale="log", xlabel="step", ylabel="eps MSE", title="training loss")
    scatter(axes[1], data, "data")
    scatter(axes[2], samples, f"DDPM, {STEPS} steps")
    page.figure(fig, "samples", "Loss curve (raw and 50-step mean), the data, and DDPM samples")
    fig, ax = plt.subplots(figsize=(5, 5))
    scatter(ax, data, "ancestral sampling paths", color="0.75")
    track = torch.stack(path)[:, :24]
    for k in range(track.shape[1]):
        ax.plot(track[:, k, 0], track[:, k, 1], lw=0.7)
        ax.plot(track[-1, k, 0], track[-1, k, 1], "k.", ms=4)
    page.figure(fig, "trajectories", "24 sampling paths (VP space x_t) from noise (wiggly start) to the data")
    frames = []
    for i in list(range(0, STEPS, 4)) + [STEPS]:
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
        scatter(ax, path[i], f"step {i} / {STEPS}")
        frames.append(figure_image(fig))
    page.animation(frames, "denoising", "The point cloud denoising step by step")
    real = sliced_wasserstein(data, sample_toy(DATA, N, torch.Generator().manual_seed(7)))
    page.table(["samples", "sliced Wasserstein distance to the data"],
               [["DDPM, trained", sliced_wasserstein(samples, data)], ["DDPM, untrained network",
                sliced_wasserstein(baseline, data)], ["a second draw of the data itself", real]])
    page.text(f"Final training loss (mean of the last 200 steps): {sum(losses[-200:]) / 200:.3f}.")
    return page.write()
