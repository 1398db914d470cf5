"""Sampler accuracy on data whose exact denoiser is known: a 2-D Gaussian mixture (8 modes on a ring).

For p = sum_k w_k N(mu_k, s^2 I), the ideal denoiser is closed form (Tweedie):
    E[x0 | x, sigma] = sum_k P(k | x) (mu_k + s^2 / (s^2 + sigma^2) (x - mu_k)),  P(k | x) ~ w_k N(x; mu_k, (s^2 + sigma^2) I)
so sampler error is pure discretisation error. On Stable Diffusion's schedule (sigma 0.029 .. 14.6, Karras
spacing) we measure, at 5, 10, 20 and 50 steps:
  * deterministic samplers: RMS distance to the probability-flow ODE solution from the same x_T (reference:
    Heun with 4000 steps down to sigma_min, then the final denoising jump every sampler makes), and the
    empirical order of convergence, slope of log error against log steps between 20 and 50 steps;
  * stochastic samplers: sliced Wasserstein-2 distance to fresh samples of the true mixture (the value two
    independent true sample sets give is the noise floor).
In this VE view DDIM is exactly Euler and DDPM exactly Euler a on the same sigma list, so their rows agree.
Writes docs/samplers.md (table) and docs/samplers.png (plot). Run: python benchmarks/samplers.py
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from nanodiffusion.samplers import SAMPLERS, sample_heun
from nanodiffusion.schedules import NoiseSchedule

STEPS = (5, 10, 20, 50)
MODES, RADIUS, MODE_STD = 8, 1.0, 0.1
SAMPLES = 20000   # per stochastic run
DETERMINISTIC = ["euler", "heun", "lms", "dpm2", "dpmpp_2m", "ddim", "plms", "unipc"]
STOCHASTIC = ["euler_a", "ddpm", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "lcm", "langevin"]
DOCS = Path(__file__).resolve().parents[1] / "docs"

angles = torch.arange(MODES, dtype=torch.float64) * 2 * math.pi / MODES
MEANS = RADIUS * torch.stack([angles.cos(), angles.sin()], 1)


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """E[x0 | x, sigma] for the mixture (posterior-weighted per-mode Wiener filters)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
    var = MODE_STD**2 + sigma**2                                    # (B or 1, 1)
    logits = -((x[:, None, :] - MEANS) ** 2).sum(-1) / (2 * var)     # (B, K), equal weights
    weights = logits.softmax(-1)[..., None]
    per_mode = MEANS + (MODE_STD**2 / var)[:, None] * (x[:, None, :] - MEANS)
    return (weights * per_mode).sum(1)


def sample_data(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.randint(MODES, (n,), generator=generator)
    return MEANS[k] + MODE_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 64) -> float:
    """Sliced Wasserstein-2: mean over random directions of the 1-D W2 between the projected samples."""
    g = torch.Generator().manual_seed(123)
    dirs = torch.randn(2, projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


class Counted:
    """The exact denoiser, counting network evaluations."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        return exact_denoiser(x, sigma)


def reference(x_t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The PF-ODE from sigma_max to sigma_min by Heun with 4000 steps, then the jump x0 = D(x, sigma_min)."""
    fine = schedule.sigmas(4000, "karras")[:-1]
    return exact_denoiser(sample_heun(exact_denoiser, x_t, fine), fine[-1])


def run() -> list[dict]:
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2000, 2, generator=g, dtype=torch.float64) * schedule.sigma_max
    truth = reference(x_t, schedule)
    rows = []
    for name in DETERMINISTIC + STOCHASTIC:
        info = SAMPLERS[name]
        row = {"name": name, "display": info.display_name, "stochastic": info.stochastic, "err": [], "nfe": []}
        for steps in STEPS:
            sigmas = info.sigmas(schedule, steps, "karras")
            model = Counted()
            if info.stochastic:
                gen = torch.Generator().manual_seed(steps)
                x = torch.randn(SAMPLES, 2, generator=gen, dtype=torch.float64)
                x = x * info.initial_noise_scale(sigmas, schedule)
                out = info.fn(model, x, sigmas, generator=gen)
                row["err"].append(sliced_w2(out, sample_data(SAMPLES, gen)))
            else:
                out = info.fn(model, x_t, sigmas)
                row["err"].append(float((out - truth).pow(2).sum(1).mean().sqrt()))
            row["nfe"].append(model.calls)
        e20, e50 = row["err"][STEPS.index(20)], row["err"][STEPS.index(50)]
        row["order"] = math.log(e20 / e50) / math.log(50 / 20) if not info.stochastic else None
        rows.append(row)
    g = torch.Generator().manual_seed(99)
    floor = sliced_w2(sample_data(SAMPLES, g), sample_data(SAMPLES, g))
    rows.append({"name": "floor", "display": "(two true sample sets)", "stochastic": True,
                 "err": [floor] * len(STEPS), "nfe": [0] * len(STEPS), "order": None})
    return rows


def table(rows: list[dict], seconds: float) -> str:
    head = ["Sampler", "metric"] + [f"{s} steps" for s in STEPS] + ["NFE at " + ", ".join(map(str, STEPS)),
                                                                      "order (20 -> 50)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metric = "sliced W2 to data" if r["stochastic"] else "RMS error vs ODE"
        order = "-" if r["order"] is None else f"{r['order']:.2f}"
        cells = [r["display"], metric] + [f"{e:.2e}" for e in r["err"]] + [", ".join(map(str, r["nfe"])), order]
        lines.append("| " + " | ".join(cells) + " |")
    intro = (__doc__.split("Writes docs")[0].strip() + f"\n\nMeasured by `python benchmarks/samplers.py` in "
             f"{seconds:.0f} s (CPU, float64).\n\n![sampler error against steps](samplers.png)\n\n")
    return "# Sampler accuracy\n\n" + intro + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Two log-log panels (error vs steps): deterministic ODE error, stochastic sliced W2 (matplotlib, Agg)."""
    from nanodiffusion.learn.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    panels = [(False, "deterministic: RMS error vs exact ODE"), (True, "stochastic: sliced W2 to the data")]
    for ax, (stochastic, title) in zip(axes, panels):
        for r in (r for r in rows if r["stochastic"] == stochastic):
            floor = r["name"] == "floor"
            ax.plot(STEPS, r["err"], "--" if floor else "o-", color="0.5" if floor else None, label=r["display"])
        ax.set(xscale="log", yscale="log", xlabel="steps", ylabel="error", title=title)
        ax.set_xticks(STEPS, [str(s) for s in STEPS])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    start = time.time()
    rows = run()
    seconds = time.time() - start
    DOCS.mkdir(exist_ok=True)
    text = table(rows, seconds)
    (DOCS / "samplers.md").write_text(text)
    plot(rows, DOCS / "samplers.png")
    print(text)


if __name__ == "__main__":
    main()
