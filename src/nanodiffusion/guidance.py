"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022)."""

from __future__ import annotations

from typing import Callable

import torch

DenoiserFn = Callable[..., torch.Tensor]


def cfg_denoiser(denoiser: DenoiserFn, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                 scale: float, min_sigma: float | None = None) -> DenoiserFn:
    """D~(x, sigma) = D(x, sigma; uncond) + scale (D(x, sigma; cond) - D(x, sigma; uncond)).

    Ho & Salimans 2022, eq. 6, written for x0 instead of eps (the same for any affine prediction). Both
    branches run as one batch [uncond, cond]; each conditioning tensor is concatenated along dim 0.
    Scale 1 is the conditional model alone, so the unconditional half is skipped. With `min_sigma`, guidance
    is applied only while sigma > min_sigma and the conditional model runs alone below it (an approximate
    fast path: guidance limited to an interval of noise levels, Kynkaanniemi et al. 2024, here cut at the
    low-noise end, where it matters least, so the last steps cost one network pass instead of two).
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def guided(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if scale == 1 or (min_sigma is not None and float(torch.as_tensor(sigma).max()) <= min_sigma):
            return denoiser(x, sigma, **cond)
        sigma = torch.as_tensor(sigma)
        sigma = sigma.repeat(2) if sigma.ndim else sigma
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), sigma, **both).chunk(2)
        return x0_uncond + scale * (x0_cond - x0_uncond)

    return guided
