"""Lesson `forward`: the noising process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps under four schedules."""

from __future__ import annotations

from pathlib import Path

import torch

from ..images import image_grid
from ..schedules import NoiseSchedule
from .report import Page, pictures, pyplot
from .toys import shapes_images

SCHEDULES = {
    "linear (DDPM)": NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02),
    "scaled-linear (SD)": NoiseSchedule("scaled_linear"),
    "cosine": NoiseSchedule("squaredcos_cap_v2"),
    "scaled-linear, zero-terminal SNR": NoiseSchedule("scaled_linear", rescale_zero_terminal_snr=True),
}
TIMESTEPS = [0, 100, 250, 500, 750, 900, 999]


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("Diffusion models learn to undo a fixed noising process. Each training timestep t mixes the image "
              "with Gaussian noise; the schedule of betas decides how fast the signal fades:")
    page.equation(r"x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\qquad "
                  r"\bar\alpha_t = \prod_{s\le t}(1-\beta_s),\qquad \mathrm{SNR}(t) = \bar\alpha_t/(1-\bar\alpha_t)")
    page.code("schedules.py:NoiseSchedule", "schedules.py:cosine_betas", "schedules.py:rescale_zero_terminal_snr")
    image = shapes_images(1, 64, seed=3)[0]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    rows, numbers = [], []
    for name, schedule in SCHEDULES.items():
        abar = schedule.alphas_cumprod.float()
        rows += pictures(torch.cat([abar[t].sqrt() * image + (1 - abar[t]).sqrt() * noise for t in TIMESTEPS]))
        numbers.append([name, float(abar[500]), float(abar[-1]), float((abar[-1] / (1 - abar[-1])).log10())])
    page.image(image_grid(rows, columns=len(TIMESTEPS)), "images",
               f"One image noised with the same eps at t = {', '.join(map(str, TIMESTEPS))} (columns); rows: "
               + "; ".join(SCHEDULES))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, schedule in SCHEDULES.items():
        abar = schedule.alphas_cumprod
        ax1.plot(abar, label=name)
        ax2.plot((abar / (1 - abar)).log(), label=name)
    ax1.set(xlabel="timestep t", ylabel=r"$\bar\alpha_t$", title="signal kept")
    ax2.set(xlabel="timestep t", ylabel="log SNR", title="log signal-to-noise ratio")
    ax1.legend(fontsize=8)
    page.figure(fig, "schedules", "alpha_bar and log-SNR of the four schedules")
    page.text("The linear schedule destroys the image by t = 500 already; the scaled-linear schedule of Stable "
              "Diffusion keeps more signal; the cosine schedule spends its steps evenly in log-SNR; the "
              "zero-terminal-SNR rescaling makes the last step pure noise (SNR 0), so training sees what "
              "sampling starts from (Lin et al. 2023).")
    page.table(["schedule", "alpha_bar at t=500", "alpha_bar at t=999", "log10 SNR at t=999"], numbers)
    return page.write()
