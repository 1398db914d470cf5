"""Convolutional building blocks shared by the UNet and the VAE: timestep features, the residual block, 2x
down/upsampling, and the three kinds of resolution level (down, middle, up) that stack them.

Attribute names follow diffusers (resnets, attentions, downsamplers, upsamplers, time_emb_proj, ...), so
a diffusers state_dict loads with no key map. Layers are plain nn.Conv2d / nn.Linear; the CPU fast path
(oneDNN-packed weights) is applied to a loaded model by packing.py.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionFactory = Callable[[int], nn.Module]  # channels -> module called as attn(h, context)

def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features sin/cos(t / max_period^(i / (dim/2 - shift))) (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features: Linear, SiLU, Linear (Ho et al. 2020, DDPM). With `cond_dim`, a
    condition embedding (an LCM's guidance scale w, Luo et al. 2023 §4.2) is projected and added to the features."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        # the float32 sinusoid in the biases' dtype: a model cast to half precision computes the MLP in it (storage.py
        # and precision.py keep biases, and so the MLP's compute, float32)
        x = x.to(self.linear_1.bias.dtype)
        if condition is not None:
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Residual block x + conv(SiLU(GN(conv(SiLU(GN(x))) + W SiLU(temb)))) (He et al. 2016; DDPM's time injection)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + self.conv2(F.silu(self.norm2(h)))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0 one zero row and column are added at the bottom/right first (the VAE's)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to `size`, the matching skip's size) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class DownBlock2D(nn.Module):
    """One encoder level: resnets (each followed by attention when given), then a 2x downsample.
    Returns the output and the skip activations (one per resnet, one after the downsample)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, temb_channels: int | None,
                 groups: int, eps: float, add_downsample: bool, downsample_padding: int = 1,
                 attention: AttentionFactory | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                   temb_channels, groups, eps) for i in range(num_layers))
        self.attentions = nn.ModuleList(attention(out_channels) for _ in range(num_layers) if attention)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)] if add_downsample else [])

    def forward(self, h: Tensor, temb: Tensor | None = None,
                context: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h, context)
            skips.append(h)
        for downsample in self.downsamplers:
            h = downsample(h)
            skips.append(h)
        return h, skips


class MidBlock2D(nn.Module):
    """The bottleneck: resnet, then (attention, resnet) num_layers times (attention left out when not given)."""

    def __init__(self, channels: int, temb_channels: int | None, groups: int, eps: float,
                 attention: AttentionFactory | None = None, num_layers: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, groups, eps)
                                     for _ in range(num_layers + 1))
        self.attentions = nn.ModuleList(attention(channels) for _ in range(num_layers) if attention)

    def forward(self, h: Tensor, temb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        h = self.resnets[0](h, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions:
                h = self.attentions[i](h, context)
            h = resnet(h, temb)
        return h


class UpBlock2D(nn.Module):
    """One decoder level: resnets (each on [h, skip] concatenated when skips are given, then attention when
    given), then a 2x upsample. skip_channels[j] is the width of the j-th skip (0: no skip, as in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], temb_channels: int | None,
                 groups: int, eps: float, add_upsample: bool, attention: AttentionFactory | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D((in_channels if j == 0 else out_channels) + skip, out_channels,
                                                   temb_channels, groups, eps) for j, skip in enumerate(skip_channels))
        self.attentions = nn.ModuleList(attention(out_channels) for _ in skip_channels if attention)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, h: Tensor, temb: Tensor | None = None, context: Tensor | None = None,
                skips: list[Tensor] | None = None) -> Tensor:
        """Pops this level's skips off the end of `skips`; the upsample then matches the next skip's size."""
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = resnet(h, temb)
            if self.attentions:
                h = self.attentions[i](h, context)
        for upsample in self.upsamplers:
            h = upsample(h, skips[-1].shape[-2:] if skips else None)
        return h
