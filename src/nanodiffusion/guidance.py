"""Guidance as denoiser wrappers: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""

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


def classifier_guidance(denoiser: DenoiserFn, classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        labels: torch.Tensor, scale: float) -> DenoiserFn:
    """D~(x, sigma) = D(x, sigma) + scale sigma^2 grad_x log p(y | x, sigma) (Dhariwal & Nichol 2021, Alg. 1).

    The score of x = x0 + sigma eps is (D(x, sigma) - x) / sigma^2 (Tweedie), so adding scale grad log p(y | x) to
    the score adds scale sigma^2 times it to the x0 estimate. `classifier(x, sigma) -> logits` is noise-conditional
    and sees the same variance-exploding x as the denoiser; its gradient is taken with autograd.
    """

    def guided(x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        x0 = denoiser(x, sigma, **cond)
        if scale == 0:
            return x0
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = torch.log_softmax(classifier(x_in, sigma), dim=-1)
            chosen = log_p.gather(1, labels.reshape(-1, 1).to(log_p.device)).sum()
            grad = torch.autograd.grad(chosen, x_in)[0]
        return x0 + scale * sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 * grad

    return guided
