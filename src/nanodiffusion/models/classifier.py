"""A noise-conditional image classifier p(y | x, sigma) for classifier guidance (Dhariwal & Nichol 2021, sec. 4):
a small convolutional network on x = x0 + sigma eps, told the noise level through sinusoidal features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .resnet import timestep_embedding


class NoisyClassifier(nn.Module):
    """logits(x, sigma) for x in variance-exploding space; the input is scaled by 1 / sqrt(1 + sigma^2)."""

    def __init__(self, in_channels: int, classes: int, width: int = 64, embed: int = 64):
        super().__init__()
        self.embed = embed
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.noise = nn.Sequential(nn.Linear(embed, width), nn.SiLU(), nn.Linear(width, 3 * width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.noise(timestep_embedding(100 * (sigma.log() + 5), self.embed))
        shifts = [s[:, :, None, None] for s in emb.chunk(3, dim=1)]
        h = x / (1 + sigma.to(x)[:, None, None, None] ** 2).sqrt()
        for conv, shift in zip((self.conv1, self.conv2, self.conv3), shifts):
            h = nn.functional.silu(conv(h) + shift)
        return self.head(h.mean((2, 3)))

