"""Guidance as denoiser wrappers: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

DenoiserFn = Callable[..., torch.Tensor]
Conditioning = dict[str, torch.Tensor]


class ConditioningSchedule(Protocol):
    """Conditioning that changes with the sampling step: the (inputs, weight) parts to guide with at a step."""

    def at(self, step: int) -> list[tuple[Conditioning, float | torch.Tensor]]: ...


@dataclass(frozen=True)
class Constant:
    """A plain conditioning as a schedule: one part, weight 1, at every step."""

    inputs: Conditioning

    def at(self, step: int) -> list[tuple[Conditioning, float | torch.Tensor]]:
        return [(self.inputs, 1.0)]


def cfg_denoiser(denoiser: DenoiserFn, cond: Conditioning | ConditioningSchedule,
                 uncond: Conditioning | ConditioningSchedule, scale: float, min_sigma: float | None = None,
                 sigmas: torch.Tensor | None = None) -> DenoiserFn:
    """D~(x, sigma) = D(x, sigma; uncond) + sum_i w_i scale (D(x, sigma; cond_i) - D(x, sigma; uncond)).

    Ho & Salimans 2022, eq. 6, written for x0 instead of eps (the same for any affine prediction); with several
    weighted parts (`a AND b :w`) it is the conjunction of composable diffusion (Liu et al. 2022), and a plain
    prompt is one part of weight 1. `cond` / `uncond` are dicts of inputs ({"context": ...}) or schedules of them
    (prompt_schedule.BatchConditioning); a schedule is read at the step i with sigmas[i] >= sigma >
    sigmas[i + 1] of the sampler's `sigmas` (midpoint evaluations belong to their step). All branches run as one
    batch [uncond, cond_1, ..., cond_n]; each input is concatenated along dim 0. One part whose weight times the
    scale is 1 is that conditional model alone, so the unconditional branch is skipped. With `min_sigma`, guidance
    is applied only while sigma > min_sigma and scale is 1 below it (an approximate fast path: guidance limited to
    an interval of noise levels, Kynkaanniemi et al. 2024, here cut at the low-noise end, where it matters least,
    so the last steps of a plain prompt cost one network pass instead of two).
    """
    cond, uncond = as_schedule(cond), as_schedule(uncond)
    if sigmas is None and not (isinstance(cond, Constant) and isinstance(uncond, Constant)):
        raise ValueError("a prompt schedule needs the sampler's sigmas, to find the step of each call")
    keys, uncond_keys = set(cond.at(0)[0][0]), set(uncond.at(0)[0][0])
    if keys != uncond_keys:
        raise ValueError(f"cond and uncond need the same keys, got {sorted(keys)} and {sorted(uncond_keys)}")
    bounds = [] if sigmas is None else [float(s) for s in sigmas[1:-1]]

    def guided(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        level = float(torch.as_tensor(sigma).max())
        step = sum(bound >= level for bound in bounds)
        parts, negative = cond.at(step), uncond.at(step)[0][0]
        guidance = 1.0 if min_sigma is not None and level <= min_sigma else scale
        if len(parts) == 1 and not torch.is_tensor(parts[0][1]) and parts[0][1] * guidance == 1:
            return denoiser(x, sigma, **parts[0][0])
        branches = [negative, *(inputs for inputs, _ in parts)]
        batched = {key: torch.cat([inputs[key] for inputs in branches]) for key in negative}
        n = len(branches)
        sigma = torch.as_tensor(sigma)
        x0_uncond, *x0_conds = denoiser(torch.cat([x] * n), sigma.repeat(n) if sigma.ndim else sigma,
                                        **batched).chunk(n)
        x0 = x0_uncond
        for x0_cond, (_, weight) in zip(x0_conds, parts):
            x0 = x0 + per_row(weight, x0) * guidance * (x0_cond - x0_uncond)
        return x0

    return guided


def per_row(weight: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A part's weight as a factor of x: one number, or one per batch row (rows whose prompts differ)."""
    return weight.to(x).reshape(-1, *[1] * (x.ndim - 1)) if torch.is_tensor(weight) else weight


@dataclass(frozen=True)
class LayoutGuidance:
    """Two-condition guidance for a UNet that reads a layout map beside the text (Brooks et al. 2023,
    InstructPix2Pix, eq. 3, with the map as the image condition):
    D(u) + s_L (D(map) - D(u)) + s_T (D(map, text) - D(map)). Written as cfg_denoiser's parts at scale s_T: each
    part also enters with the unconditional text states beside its map, weight w (s_L - s_T) / s_T (`ratio`)."""

    cond: ConditioningSchedule
    uncond: ConditioningSchedule
    ratio: float

    def at(self, step: int) -> list[tuple[Conditioning, float | torch.Tensor]]:
        parts = self.cond.at(step)
        empty = self.uncond.at(step)[0][0]["context"]
        return parts + [({**inputs, "context": empty}, weight * self.ratio) for inputs, weight in parts]


def as_schedule(cond: Conditioning | ConditioningSchedule) -> ConditioningSchedule:
    """A schedule as it is; a dict of inputs as the one-part constant schedule."""
    return Constant(cond) if isinstance(cond, dict) else cond


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


def guidance_scale_embedding(scale: float, dim: int, batch: int) -> torch.Tensor:
    """The guidance-scale condition of a guidance-distilled UNet (LCM, Luo et al. 2023 §4.2; Meng et al. 2023):
    sinusoidal features of 1000 (w - 1), [batch, dim], the model then runs without classifier-free guidance."""
    w = torch.full((batch, 1), 1000.0 * (scale - 1.0))
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))
    features = torch.cat([torch.sin(w * frequencies), torch.cos(w * frequencies)], dim=1)
    return torch.nn.functional.pad(features, (0, dim % 2))
