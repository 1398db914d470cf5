"""Lesson `score-langevin`: a noise-conditional score network (NCSN, Song & Ermon 2019) trained by denoising
score matching, its score fields, and annealed Langevin dynamics on 2-D data and on shapes images."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.toy2d import sample_toy, sliced_wasserstein
from ..denoisers import Denoiser
from ..images import image_grid
from ..samplers import sample_langevin
from ..schedules import exponential_sigmas
from ..train.fit import fit
from ..train.score import dsm_loss, log_uniform_sigmas
from .report import Page, pictures, pyplot
from .toys import TOY_SCHEDULE, image_unet, scatter, shapes_images, train_toy, unconditional

DATA, N, SHAPE_STEPS = "moons", 2000, 300
LEVELS = exponential_sigmas(12, 0.02, 8.0)


def langevin(denoiser, shape: tuple, seed: int, steps_per_sigma: int = 20) -> torch.Tensor:
    """Annealed Langevin from N(0, sigma_max^2) down the geometric levels, then one denoising jump."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.cat([LEVELS, LEVELS.new_zeros(1)])
    with torch.no_grad():
        return sample_langevin(denoiser, torch.randn(shape, generator=g) * float(LEVELS[0]), sigmas, generator=g,
                               steps_per_sigma=steps_per_sigma, step_scale=0.5)


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("A score model s(x, sigma) estimates the gradient of the log density of the data blurred by noise "
              "of level sigma. Denoising score matching trains it without knowing the density; with "
              "x = x0 + sigma eps the best denoiser D gives the score by Tweedie's formula. Annealed Langevin "
              "dynamics then samples by following the score plus noise, from large sigma to small:")
    page.equation(r"\mathcal{L} = \mathbb{E}\,\sigma^2\big\|s_\theta(x_0+\sigma\epsilon,\sigma) + \epsilon/\sigma\big\|^2,"
                  r"\quad s = \frac{D(x,\sigma)-x}{\sigma^2},\quad x \leftarrow x + \tfrac{a}{2}s_\theta(x,\sigma_i) "
                  r"+ \sqrt{a}\,z,\ a = \eta\,\sigma_i^2")
    page.code("train/score.py:dsm_loss", "train/score.py:log_uniform_sigmas", "samplers.py:sample_langevin",
              "models/mlp.py:NoiseConditionalMLP")
    untrained = train_toy(DATA, steps=0, noise="ncsn")[1]
    _, denoiser, _ = train_toy(DATA, steps=1200, noise="ncsn")
    data = sample_toy(DATA, N, torch.Generator().manual_seed(99))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    grid = torch.stack(torch.meshgrid(torch.linspace(-2.8, 2.8, 21), torch.linspace(-2.8, 2.8, 21),
                                      indexing="xy"), -1).reshape(-1, 2)
    for ax, sigma in zip(axes, (2.0, 0.5, 0.1)):
        with torch.no_grad():
            score = (denoiser(grid, sigma) - grid) / sigma**2
        arrows = score / score.norm(dim=1, keepdim=True).clamp(min=1e-8)
        scatter(ax, data, f"score field, sigma = {sigma}", color="0.7")
        ax.quiver(grid[:, 0], grid[:, 1], arrows[:, 0], arrows[:, 1], score.norm(dim=1).log(), cmap="viridis",
                  scale=30, width=0.004)
    page.figure(fig, "score-fields", "Direction of the learned score at three noise levels (colour: log |score|): "
                                     "at large sigma it points to the bulk, at small sigma onto the moons")
    samples, baseline = langevin(denoiser, (N, 2), 1), langevin(untrained, (N, 2), 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    scatter(axes[0], data, "data")
    scatter(axes[1], samples, "annealed Langevin, trained")
    scatter(axes[2], baseline, "annealed Langevin, untrained")
    page.figure(fig, "samples", f"Annealed Langevin: {len(LEVELS)} levels from 8 to 0.02, 20 steps each, "
                                   "step a = 0.5 sigma^2 (the untrained model's samples leave the plot: see the "
                                   "table)")
    rows = [["2-D moons, trained score", sliced_wasserstein(samples, data)],
            ["2-D moons, untrained score", sliced_wasserstein(baseline, data)],
            ["2-D moons, a second draw of the data", sliced_wasserstein(sample_toy(DATA, N, torch.Generator()
                                                                                    .manual_seed(7)), data)]]
    torch.manual_seed(0)
    images = shapes_images(512, 16)[0]
    unet = image_unet()
    shapes_denoiser = Denoiser(unconditional(unet), TOY_SCHEDULE, "epsilon")
    g = torch.Generator().manual_seed(2)

    def loss(step: int) -> torch.Tensor:
        batch = images[torch.randint(0, len(images), (16,), generator=g)]
        return dsm_loss(shapes_denoiser, batch, log_uniform_sigmas(16, 0.01, 10.0, g), g)

    fit(unet, loss, SHAPE_STEPS, lr=2e-3, desc="shapes score model")
    drawn = langevin(shapes_denoiser, (16, 3, 16, 16), 3)
    held_out = shapes_images(256, 16, seed=5)[0].flatten(1)
    rows.append(["16 px shapes, trained score", sliced_wasserstein(drawn.flatten(1).clamp(-1, 1), held_out[:16])])
    rows.append(["16 px shapes, real images", sliced_wasserstein(held_out[16:32], held_out[:16])])
    page.image(image_grid(pictures(torch.cat([images[:8], drawn[:8]]), 4), columns=8), "shapes",
               "Top: training images (16 px). Bottom: annealed Langevin samples of a tiny UNet score model "
               f"trained for {SHAPE_STEPS} steps of batch 16")
    page.table(["samples", "sliced Wasserstein distance to the data"], rows)
    return page.write()
