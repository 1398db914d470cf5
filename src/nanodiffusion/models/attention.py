"""Attention for the UNet: multi-head (cross-)attention on torch SDPA, the GEGLU feed-forward, the transformer
block, and the spatial transformer that runs it over a feature map (LDM, Rombach et al. 2022, §3.3).

Attribute names follow diffusers (to_q, to_k, to_v, to_out.0, ff.net.0.proj, proj_in, transformer_blocks, ...).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import Conv2d, Linear

TokenMerging = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]  # (merge, unmerge) of a token set


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V, Q from x and K, V from the context (Vaswani et al. 2017, §3.2).
    upcast computes it in float32 when x is half precision (SD 2.x's attention overflows in fp16)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    def forward(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """Attention output projected back to query_dim, plus `residual` when given (added inside to_out)."""
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1), residual)


class GEGLU(nn.Module):
    """Gated GELU unit: (x W) * GELU(x V), one projection split in two (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward with a GEGLU hidden layer 4x wider than the model."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), Linear(mult * dim, dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The feed-forward output, plus `residual` when given (added inside the last projection)."""
        geglu, dropout, out = self.net
        return out(dropout(geglu(x)), residual)


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

    def forward(self, x: Tensor, context: Tensor, merging: TokenMerging | None = None) -> Tensor:
        """`merging` (merge, unmerge), when given, runs the first attention on merged tokens (ToMe)."""
        if merging is None:
            x = self.attn1(self.norm1(x), context if self.only_cross else None, residual=x)
        else:
            merge, unmerge = merging
            x = x + unmerge(self.attn1(merge(self.norm1(x)), context if self.only_cross else None))
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in (1x1 conv, or linear on tokens), transformer blocks over the
    H*W tokens, project out, plus the input (LDM §3.3). `token_merge`, when set (nanodiffusion.fast.tome), maps
    (tokens, (H, W)) to the (merge, unmerge) pair each block's self-attention then uses (ToMe for SD)."""

    token_merge: Callable[[Tensor, torch.Size], TokenMerging] | None = None

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int = 1,
                 linear: bool = False, only_cross: bool = False, upcast: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, channels) if linear else Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, only_cross, upcast)
            for _ in range(depth))
        self.proj_out = Linear(channels, channels) if linear else Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = to_tokens(h)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, None if self.token_merge is None else self.token_merge(h, x.shape[-2:]))
        if self.linear:
            return from_tokens(self.proj_out(h, to_tokens(x)), x.shape[-2:])
        return self.proj_out(from_tokens(h, x.shape[-2:]), x)


def to_tokens(x: Tensor) -> Tensor:
    """Feature map [B, C, H, W] -> H*W tokens [B, H*W, C] (no copy when x is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def from_tokens(h: Tensor, size: torch.Size) -> Tensor:
    """Tokens [B, H*W, C] -> feature map [B, C, H, W], a channels-last view of the tokens."""
    return h.unflatten(1, size).permute(0, 3, 1, 2)
