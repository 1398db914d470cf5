"""Attention for the UNet: multi-head (cross-)attention on torch SDPA, the GEGLU feed-forward, the transformer
block, and the spatial transformer that runs it over a feature map (LDM, Rombach et al. 2022, §3.3).

Attribute names follow diffusers (to_q, to_k, to_v, to_out.0, ff.net.0.proj, proj_in, transformer_blocks, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V, Q from x and K, V from the context (Vaswani et al. 2017, §3.2).
    upcast computes it in float32 when x is half precision (SD 2.x's attention overflows in fp16)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attention output projected back to query_dim."""
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU unit: (x W) * GELU(x V), one projection split in two (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward with a GEGLU hidden layer 4x wider than the model."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on the context, feed-forward, each residual.
    only_cross makes the first attention attend to the context too."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, only_cross: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, context_dim if only_cross else None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in (1x1 conv, or linear on tokens), transformer blocks over the
    H*W tokens, project out, plus the input (LDM §3.3)."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int = 1,
                 linear: bool = False, only_cross: bool = False, upcast: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, only_cross, upcast)
            for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = to_tokens(h)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = from_tokens(h, x.shape[-2:])
        if not self.linear:
            h = self.proj_out(h)
        return x + h


def to_tokens(x: Tensor) -> Tensor:
    """Feature map [B, C, H, W] -> H*W tokens [B, H*W, C] (no copy when x is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def from_tokens(h: Tensor, size: torch.Size) -> Tensor:
    """Tokens [B, H*W, C] -> feature map [B, C, H, W], a channels-last view of the tokens."""
    return h.unflatten(1, size).permute(0, 3, 1, 2)
