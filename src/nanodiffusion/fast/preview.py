"""A tiny preview decoder: latents -> RGB by one affine map per latent cell, no VAE run.

The SD latent's channels are close to a linear function of the colour of the 8x8 pixels they encode; UIs use a
hand-fitted 4x3 matrix for live previews. Here the map (4 + 1 bias inputs -> 3 outputs) is fitted by least
squares to the model's own VAE at first use: rendered shape scenes are encoded, decoded, and each latent cell
is paired with the mean colour of the decoded pixels it covers. The preview is that colour, upsampled."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.shapes import render, sample_scene
from ..images import to_tensor


class LatentPreview:
    """rgb(cell) = [z, 1] @ projection, upsampled by the VAE's factor; values in [-1, 1]."""

    def __init__(self, projection: Tensor, scale: int):
        self.projection, self.scale = projection, scale

    @classmethod
    @torch.no_grad()
    def fit(cls, vae: nn.Module, scale: int, images: int = 8, size: int = 64, seed: int = 0) -> LatentPreview:
        """Least-squares fit of the affine map from scaled latents to the VAE decoder's pooled colours."""
        rng = random.Random(seed)
        pixels = torch.cat([to_tensor(render(sample_scene(rng), size)) for _ in range(images)])
        z = vae.encode(pixels).mode()
        target = F.avg_pool2d(vae.decode(z).clamp(-1, 1), scale)
        inputs = torch.cat([z * vae.config.scaling_factor, torch.ones_like(z[:, :1])], dim=1)
        projection = torch.linalg.lstsq(cells(inputs), cells(target)).solution.float()
        return cls(projection, scale)

    def __call__(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, C, h, w] -> approximate pixels [B, 3, h * scale, w * scale] in [-1, 1]."""
        inputs = torch.cat([latents.float(), torch.ones_like(latents[:, :1], dtype=torch.float32)], dim=1)
        rgb = torch.einsum("bchw,cd->bdhw", inputs, self.projection).clamp(-1, 1)
        return F.interpolate(rgb, scale_factor=self.scale, mode="nearest")


def cells(t: Tensor) -> Tensor:
    """[B, C, h, w] -> one row per cell [B * h * w, C], in float64 for the least-squares solve."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
