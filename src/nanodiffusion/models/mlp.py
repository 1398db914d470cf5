"""A noise-conditional MLP for low-dimensional data: the score / denoising network of the 2-D toy lessons.

NCSN (Song & Ermon 2019) conditions the network on the noise level; here the level arrives as the network
timestep t that `Denoiser` passes (any monotone map of sigma works), embedded with sinusoidal features
(Vaswani et al. 2017, sec. 3.5) and added to every hidden layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .resnet import timestep_embedding


class NoiseConditionalMLP(nn.Module):
    """F(x, t): x (B, dim) and timestep t (B,) -> a prediction shaped like x (eps, x0 or velocity)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, embed: int = 32):
        super().__init__()
        self.embed = embed
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(embed, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time(timestep_embedding(t, self.embed))
        h = self.inp(x) + emb
        for layer in self.layers:
            h = h + layer(nn.functional.silu(h)) + emb
        return self.out(nn.functional.silu(h))
