"""2-D toy distributions for the lessons (eight Gaussians, two moons, a ring) and the sliced Wasserstein distance."""

from __future__ import annotations

import math

import torch

from ..errors import choice_error

TOYS = ("eight_gaussians", "moons", "ring")


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n, 2) of a toy distribution, scaled to roughly unit standard deviation per axis."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    if name == "eight_gaussians":
        angle = (u * 8).floor() * (math.pi / 4)
        points = torch.stack([angle.cos(), angle.sin()], 1) * 1.4 + 0.1 * z
    elif name == "moons":
        upper = u < 0.5
        t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        points = (torch.stack([x - 0.5, y - 0.25], 1) + 0.06 * z) * 1.6
    elif name == "ring":
        angle = u * 2 * math.pi
        points = torch.stack([angle.cos(), angle.sin()], 1) * 1.3 + 0.05 * z
    else:
        raise choice_error("toy distribution", name, list(TOYS))
    return points.float()


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions w of W1(<a, w>, <b, w>) between equal-size point clouds (Rabin et al. 2011)."""
    n = min(len(a), len(b))
    w = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w / w.norm(dim=0)
    pa, pb = (p[:n].double() @ w for p in (a, b))
    return float((pa.sort(0).values - pb.sort(0).values).abs().mean())
