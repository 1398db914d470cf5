"""DiT: a diffusion transformer over image patches with adaLN-Zero conditioning (Peebles & Xie 2023).

The image (latent) is cut into p x p patches, embedded as tokens with fixed 2-D sin-cos positions, run through
transformer blocks whose LayerNorms are modulated by the conditioning c = embed(t) + embed(label):
    h = h + gate_msa * Attn(LN(h) * (1 + scale_msa) + shift_msa)
    h = h + gate_mlp * MLP(LN(h) * (1 + scale_mlp) + shift_mlp)
with (shift, scale, gate) x 2 regressed from c by a zero-initialised linear layer ("adaLN-Zero", sec. 3.2), so
every block starts as the identity; the zero-initialised final layer makes the untrained model output 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NanoDiffusionError
from .resnet import timestep_embedding


@dataclass
class DiTConfig:
    """Sizes of a DiT (DiT-S/2 is hidden 384, depth 12, heads 6, patch 2); num_classes 0 is unconditional."""

    sample_size: int = 16
    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0
    frequency_size: int = 64


def sincos_positions(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): half the channels encode the row, half the column."""
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """One transformer block with adaLN-Zero (Peebles & Xie 2023, fig. 3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def attention(self, x: Tensor) -> Tensor:
        """Multi-head self-attention softmax(Q K^T / sqrt(d)) V over the patch tokens."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """F(x, t, labels): patchify -> DiT blocks -> adaLN final layer -> unpatchify (Peebles & Xie 2023, fig. 3)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        if c.sample_size % c.patch_size or c.hidden_size % c.num_heads or c.hidden_size % 4:
            raise NanoDiffusionError(f"DiT config does not fit: sample_size {c.sample_size} must be a multiple of "
                                     f"patch_size {c.patch_size}, hidden_size {c.hidden_size} of 4 and num_heads")
        d, p = c.hidden_size, c.patch_size
        self.patch = nn.Conv2d(c.in_channels, d, p, stride=p)
        self.register_buffer("positions", sincos_positions(d, c.sample_size // p), persistent=False)
        self.time = nn.Sequential(nn.Linear(c.frequency_size, d), nn.SiLU(), nn.Linear(d, d))
        self.labels = nn.Embedding(c.num_classes + 1, d) if c.num_classes else None   # last row: "no label" (CFG)
        self.blocks = nn.ModuleList(DiTBlock(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, p * p * c.in_channels)
        for layer in (self.ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        b, channels, height, width = x.shape
        p = self.config.patch_size
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        cond = self.time(timestep_embedding(t, self.config.frequency_size))
        if self.labels is not None:
            labels = torch.full((b,), self.config.num_classes, device=x.device) if labels is None else labels
            cond = cond + self.labels(labels.reshape(-1).expand(b).long())
        h = self.patch(x).flatten(2).transpose(1, 2) + self.positions
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.ada(cond).chunk(2, dim=1)
        h = self.out(modulate(self.norm(h), shift, scale))
        h = h.view(b, height // p, width // p, p, p, channels)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)

