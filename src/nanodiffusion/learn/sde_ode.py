"""Lesson `sde-ode`: one trained model sampled by the reverse SDE and by the probability-flow ODE (Song et al.
2021), with Euler, Heun and DPM-Solver++ (Karras et al. 2022; Lu et al. 2022): paths and error against steps."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.toy2d import sample_toy, sliced_wasserstein
from ..samplers import get_sampler
from .report import Page, pyplot
from .toys import TOY_SCHEDULE, scatter, train_toy

DATA, N = "eight_gaussians", 1000
SOLVERS = {"euler_a": "SDE", "dpmpp_2m_sde": "SDE", "euler": "ODE", "heun": "ODE", "dpmpp_2m": "ODE"}
CALLS = {"heun": lambda steps: 2 * steps - 1}


def solve(name: str, denoiser, steps: int, noise: torch.Tensor, record: list | None = None) -> torch.Tensor:
    """Run sampler `name` for `steps` Karras-spaced steps from unit `noise`; record VP-space x after each step."""
    info = get_sampler(name)
    sigmas = TOY_SCHEDULE.sigmas(steps, "karras")
    x = noise * float(sigmas[0])

    def callback(i, s, x, x0):
        record.append(x / (1 + float(sigmas[i + 1]) ** 2) ** 0.5)

    if record is not None:
        record.append(noise.clone())
    with torch.no_grad():
        return info.fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(5),
                       callback=callback if record is not None else None)


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("The forward noising is a stochastic differential equation; running it backwards needs the score. "
              "The same marginals are also produced by a deterministic ODE, the probability-flow ODE, which in "
              "the variance-exploding form x = x0 + sigma eps reads dx/dsigma = (x - D(x, sigma)) / sigma. "
              "Stochastic samplers (Euler ancestral, DPM++ 2M SDE) follow the SDE; Euler, Heun and DPM++ 2M "
              "integrate the ODE, so their result is a fixed function of the starting noise:")
    page.equation(r"dx = -2\sigma\,\nabla_x\log p_\sigma(x)\,d\sigma + \sqrt{2\sigma}\,d\bar w \quad\text{(SDE)},"
                  r"\qquad \frac{dx}{d\sigma} = -\sigma\,\nabla_x\log p_\sigma(x) = \frac{x - D(x,\sigma)}{\sigma}"
                  r"\quad\text{(ODE)}")
    page.code("samplers.py:sample_euler_ancestral", "samplers.py:sample_dpmpp_2m_sde", "samplers.py:sample_euler",
              "samplers.py:sample_heun", "samplers.py:sample_dpmpp_2m")
    _, denoiser, _ = train_toy(DATA)
    data = sample_toy(DATA, N, torch.Generator().manual_seed(99))
    noise = torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(1, len(SOLVERS), figsize=(4 * len(SOLVERS), 4))
    for ax, (name, kind) in zip(axes, SOLVERS.items()):
        path: list[torch.Tensor] = []
        solve(name, denoiser, 30, noise[:16], path)
        track = torch.stack(path)
        scatter(ax, data, f"{get_sampler(name).display_name} ({kind}), 30 steps", color="0.8")
        for k in range(track.shape[1]):
            ax.plot(track[:, k, 0], track[:, k, 1], lw=0.8)
        ax.plot(track[-1, :, 0], track[-1, :, 1], "k.", ms=4)
    page.figure(fig, "trajectories", "16 paths from the same starting noise (VP space): the SDE paths jitter and "
                                     "land in different modes; the ODE paths are smooth and agree with each other")
    reference = solve("heun", denoiser, 300, noise)
    counts = [4, 8, 16, 32, 64]
    rows, curves = [], {name: [] for name in SOLVERS}
    for name, kind in SOLVERS.items():
        for steps in counts:
            x = solve(name, denoiser, steps, noise)
            error = float((x - reference).norm(dim=1).mean())
            distance = sliced_wasserstein(x, data)
            curves[name].append((CALLS.get(name, lambda s: s)(steps), error, distance))
            rows.append([get_sampler(name).display_name, kind, steps, CALLS.get(name, lambda s: s)(steps),
                         error if kind == "ODE" else "-", distance])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, kind in SOLVERS.items():
        calls, errors, distances = zip(*curves[name])
        label = f"{get_sampler(name).display_name} ({kind})"
        if kind == "ODE":
            ax1.plot(calls, errors, "o-", label=label)
        ax2.plot(calls, distances, "o-", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="mean |x - x_ref|",
            title="ODE error vs the 300-step Heun solution")
    ax2.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="sliced Wasserstein to data",
            title="sample quality")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    page.figure(fig, "error", "Left: how fast each ODE solver converges to the exact ODE solution (higher order "
                              "= steeper). Right: distance of the samples to the data, SDE and ODE")
    page.table(["sampler", "kind", "steps", "network calls", "error vs reference", "sliced Wasserstein"], rows)
    return page.write()
