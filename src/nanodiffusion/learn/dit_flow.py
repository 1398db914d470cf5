"""Lesson `dit-flow`: rectified flow (Liu et al. 2023) against DDPM's curved paths on a 2-D toy, and a small DiT
with adaLN-Zero (Peebles & Xie 2023) against the UNet on shapes images, both trained with rectified flow."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.toy2d import sample_toy, sliced_wasserstein
from ..denoisers import Denoiser
from ..images import image_grid
from ..models.dit import DiT, DiTConfig
from ..models.mlp import NoiseConditionalMLP
from ..samplers import sample_euler
from ..train.fit import fit
from ..train.flow import flow_sigmas, rectified_flow_loss
from .report import Page, pictures, pyplot
from .toys import BATCH, TOY_SCHEDULE, image_unet, scatter, shapes_images, train_toy, unconditional

DATA, N, IMAGE_STEPS = "moons", 2000, 150


def euler_path(denoiser, sigmas: torch.Tensor, noise: torch.Tensor, native) -> list[torch.Tensor]:
    """Euler on the probability-flow ODE over `sigmas`, each x mapped to the model's native space."""
    path = [native(noise * float(sigmas[0]), float(sigmas[0]))]
    with torch.no_grad():
        sample_euler(denoiser, noise * float(sigmas[0]), sigmas,
                     callback=lambda i, s, x, x0: path.append(native(x, float(sigmas[i + 1]))))
    return path


def straightness(path: list[torch.Tensor]) -> float:
    """Mean over samples of |end - start| / path length (1 = a straight line)."""
    track = torch.stack(path)
    length = (track[1:] - track[:-1]).norm(dim=-1).sum(0)
    return float(((track[-1] - track[0]).norm(dim=-1) / length).mean())


def karras(steps: int) -> torch.Tensor:
    return TOY_SCHEDULE.sigmas(steps, "karras")


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("Rectified flow trains a velocity field on straight lines between data and noise. Each training "
              "pair's path is straight; the learned ODE follows their average, which stays straight where the "
              "pairs agree and bends where the data splits into several modes (reflow, retraining on the "
              "model's own noise-sample pairs, straightens it further; Liu et al. 2023). Below, its paths and "
              "its few-step Euler samples against DDPM's probability-flow ODE (in DDPM's VP space). The same flow "
              "objective trains any network: then a small DiT, a transformer over 2x2 patches whose blocks are "
              "conditioned by adaLN-Zero, against the UNet.")
    page.equation(r"x_s = (1-s)\,x_0 + s\,\epsilon,\quad \mathcal{L} = \mathbb{E}_{s,x_0,\epsilon}\big\|v_\theta(x_s, s)"
                  r" - (\epsilon - x_0)\big\|^2,\quad \text{adaLN-Zero: } h \leftarrow h + g\cdot "
                  r"\mathrm{Attn}(\mathrm{LN}(h)(1+a)+b),\ (a,b,g) = W c,\ W_0 = 0")
    page.code("train/flow.py:rectified_flow_loss", "train/flow.py:flow_sigmas", "denoisers.py:Denoiser (flow)",
              "models/dit.py:DiT", "models/dit.py:DiTBlock")
    torch.manual_seed(0)
    flow_net = NoiseConditionalMLP(hidden=128)
    g = torch.Generator().manual_seed(1)
    fit(flow_net, lambda step: rectified_flow_loss(flow_net, sample_toy(DATA, BATCH, g), generator=g), 1200,
        lr=2e-3, desc="rectified flow")
    flow = Denoiser(flow_net, TOY_SCHEDULE, "flow")
    _, ddpm, _ = train_toy(DATA, steps=1200, desc="ddpm")
    data = sample_toy(DATA, N, torch.Generator().manual_seed(99))
    noise = torch.randn(N, 2, generator=torch.Generator().manual_seed(2))
    flow_path = euler_path(flow, flow_sigmas(100), noise[:300], lambda x, s: x / (1 + s))
    ddpm_path = euler_path(ddpm, karras(100), noise[:300], lambda x, s: x / (1 + s * s) ** 0.5)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, path, name in ((axes[0], ddpm_path, "DDPM (eps), VP space"), (axes[1], flow_path, "rectified flow")):
        track = torch.stack(path)[:, :40]
        scatter(ax, data, f"{name}: straightness {straightness(path):.3f}", color="0.8")
        for k in range(track.shape[1]):
            ax.plot(track[:, k, 0], track[:, k, 1], lw=0.8)
    page.figure(fig, "paths", "ODE paths from the same noise (100 Euler steps); straightness = |end - start| / "
                              "path length, averaged over 300 paths")
    rows = []
    for steps in (1, 2, 4, 8, 32):
        with torch.no_grad():
            x_flow = sample_euler(flow, noise * float(flow_sigmas(steps)[0]), flow_sigmas(steps))
            x_ddpm = sample_euler(ddpm, noise * float(karras(steps)[0]), karras(steps))
        rows.append([steps, sliced_wasserstein(x_ddpm, data), sliced_wasserstein(x_flow, data)])
    page.table(["Euler steps", "DDPM eps model: sliced Wasserstein", "rectified flow: sliced Wasserstein"], rows)
    images = shapes_images(512, 16)[0]
    held_out = shapes_images(64, 16, seed=5)[0]
    models = {"DiT (patch 2, width 96, depth 4)": DiT(DiTConfig(sample_size=16, hidden_size=96, depth=4,
                                                                num_heads=4)),
              "UNet (32, 64 channels)": image_unet()}
    results, samples = [], []
    for name, model in models.items():
        net = model if isinstance(model, DiT) else unconditional(model)
        g = torch.Generator().manual_seed(3)
        started = time.process_time()
        losses = fit(model, lambda step: rectified_flow_loss(
            net, images[torch.randint(0, len(images), (32,), generator=g)], generator=g), IMAGE_STEPS, lr=1e-3,
            desc=name.split()[0])
        seconds = time.process_time() - started
        sigmas = flow_sigmas(20)
        with torch.no_grad():
            drawn = sample_euler(Denoiser(net, TOY_SCHEDULE, "flow"),
                                 torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * sigmas[0],
                                 sigmas).clamp(-1, 1)
        samples += pictures(drawn[:8], 4)
        results.append([name, sum(p.numel() for p in model.parameters()), seconds / IMAGE_STEPS * 1000,
                        sum(losses[-100:]) / 100, sliced_wasserstein(drawn.flatten(1), held_out[:16].flatten(1))])
    results.append(["real images", "-", "-", "-", sliced_wasserstein(held_out[16:32].flatten(1),
                                                                      held_out[:16].flatten(1))])
    page.image(image_grid(samples, columns=8), "shapes", f"Rectified-flow samples (20 Euler steps) after "
               f"{IMAGE_STEPS} training steps of batch 32 on 16 px shapes. Top: DiT. Bottom: UNet")
    page.table(["model", "parameters", "CPU ms / training step", "final loss", "sliced Wasserstein (pixels)"],
               results)
    return page.write()
