"""The starting noise of a generation: one seeded draw per image, with the popular web UI's variation seeds.

A variation seed mixes a second draw into the first by spherical interpolation, so `subseed_strength` walks the
sphere the Gaussian noise lives on from the seed's image towards the subseed's (slerp keeps the norm a Gaussian
draw would have, which a straight mix does not). Seed resize draws the seed's noise at another size and pastes
its centre, so a composition found at one size keeps its layout at a nearby size.
"""

from __future__ import annotations

import torch
from torch import Tensor


def slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985): sin((1-t) w)/sin w a + sin(t w)/sin w b, w the angle of a and b."""
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def centre_paste(small: Tensor, big: Tensor) -> Tensor:
    """`big` with the centre of `small` written over its centre (the overlap of the two, both centred)."""
    out = big.clone()
    h, w = min(small.shape[-2], big.shape[-2]), min(small.shape[-1], big.shape[-1])
    sy, sx = (small.shape[-2] - h) // 2, (small.shape[-1] - w) // 2
    by, bx = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
    out[..., by:by + h, bx:bx + w] = small[..., sy:sy + h, sx:sx + w]
    return out


def seeded_noise(shape: tuple[int, ...], generator: torch.Generator, subseed: int = 0, subseed_strength: float = 0.0,
                 resize_from: tuple[int, ...] | None = None) -> Tensor:
    """One image's noise `shape` (1, C, h, w): N(0, I) from the image's seeded generator, slerped towards
    `subseed`'s draw by subseed_strength; drawn at the latent shape `resize_from` and centre-pasted into a further
    draw of `shape` when that differs."""
    drawn = shape if resize_from is None else resize_from
    noise = torch.randn(drawn, generator=generator)
    if subseed_strength > 0:
        noise = slerp(subseed_strength, noise, torch.randn(drawn, generator=torch.Generator().manual_seed(subseed)))
    if tuple(drawn) != tuple(shape):
        noise = centre_paste(noise, torch.randn(shape, generator=generator))
    return noise
