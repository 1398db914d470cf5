"""Convolutional building blocks shared by the UNet and the VAE: the convolution, timestep features, the residual
block, 2x down/upsampling, and the three kinds of resolution level (down, middle, up) that stack them.

Attribute names follow diffusers (resnets, attentions, downsamplers, upsamplers, time_emb_proj, ...), so
a diffusers state_dict loads with no key map.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionFactory = Callable[[int], nn.Module]  # channels -> module called as attn(h, context)

PACKED_DTYPES = (torch.float32, torch.bfloat16)
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (cache key, weight in oneDNN layout)
PACK_SIDE = 32   # the input size a weight is packed for: oneDNN's blocked weight layout serves any input size


def pack_side(cells: int) -> int:
    """The packing size for inputs of `cells` positions: PACK_SIDE from 32 x 32 up, else the exact square side."""
    return PACK_SIDE if cells >= PACK_SIDE * PACK_SIDE else max(1, round(cells ** 0.5))


class PackedWeight:
    """Mixin for Conv2d / Linear: for CPU float32 / bfloat16 inference the layer convolves / multiplies with a copy
    of its weight in oneDNN's blocked layout and the input's dtype, made once per (weight, weight version, dtype):
    plain conv2d / linear reorder the weight on every call, which on small inputs costs more than the arithmetic
    (docs/performance.md). Same result to rounding. storage.pack_weights makes the copies while a model loads
    and hands the plain weight's file pages back; set PackedWeight.enabled = False to use the plain weight."""

    enabled = True

    def packs_for(self, dtype: torch.dtype) -> bool:
        """Whether computing in `dtype` uses a packed weight: float32 / bfloat16 from a float32 weight or one
        already in that dtype (a packed float32 copy of half-precision storage would bring its memory back)."""
        return self.enabled and dtype in PACKED_DTYPES and self.weight.dtype in (torch.float32, dtype)

    def packable(self, x: Tensor) -> bool:
        """CPU inference in a packed dtype (packs_for): no autograd, no torch.compile tracing, oneDNN available,
        and a weight whose changes are tracked (not made under inference_mode)."""
        w = self.weight
        return (self.packs_for(x.dtype) and x.device.type == "cpu" and not w.is_inference()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling())

    def compute_bias(self, x: Tensor) -> Tensor | None:
        """The bias in x's dtype (float32 biases of layers computed in bfloat16)."""
        return self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)

    def compute_weight(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weight and bias in x's dtype for this call only: weights stored in half precision (storage.py) or
        computed in bfloat16 (precision.py) keep no second full copy."""
        return (self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)), self.compute_bias(x)

    def is_packed(self) -> bool:
        """Whether a packed copy of the current weight exists (in any dtype)."""
        cached = _packed.get(self)
        return cached is not None and cached[0][:2] == (self.weight.data_ptr(), self.weight._version)

    def packed_weight(self, dtype: torch.dtype, side: int = PACK_SIDE) -> Tensor:
        """The weight in oneDNN's layout and `dtype` for inputs of about side x side, packed on first use (or by
        storage.pack_weights) and again whenever the weight changes (its storage or version, e.g. a LoRA merged
        into it) or the input size does: a layout picked for 32 x 32 runs up to 6x slower on 4 x 4 - 16 x 16
        inputs (the built-in model's), so small inputs get their own."""
        key = (self.weight.data_ptr(), self.weight._version, dtype, side)
        cached = _packed.get(self)
        if cached is None or cached[0] != key:
            cached = _packed[self] = (key, self.pack(self.weight.detach().to(dtype), side))
        return cached[1]


class Conv2d(PackedWeight, nn.Conv2d):
    """nn.Conv2d convolving with a oneDNN-packed weight at inference (PackedWeight); output is channels-last.
    residual, when given, is added to the output (inside the convolution when packed: no extra pass)."""

    def pack(self, w: Tensor, side: int) -> Tensor:
        """The weight in oneDNN's convolution layout."""
        shape = [1, self.in_channels, side, side]
        return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), self.padding, self.stride, self.dilation,
                                                          self.groups, shape)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        plain_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if not (self.packable(x) and x.dim() == 4 and plain_padding):
            return add(residual, self._conv_forward(x, *self.compute_weight(x)))
        conv = (self.padding, self.stride, self.dilation, self.groups)
        weight, bias = self.packed_weight(x.dtype, pack_side(x.shape[-2] * x.shape[-1])), self.compute_bias(x)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *conv, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual.to(x.dtype), weight, bias, *conv,
                                                              "add", None, None, [], None)


class Linear(PackedWeight, nn.Linear):
    """nn.Linear multiplying by a oneDNN-packed weight at inference (PackedWeight).
    residual, when given, is added to the output (inside the matmul when packed: no extra pass)."""

    def pack(self, w: Tensor, side: int) -> Tensor:
        """The weight in oneDNN's matmul layout."""
        return torch.ops.mkldnn._reorder_linear_weight(w, side * side)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if not self.packable(x):
            return add(residual, F.linear(x, *self.compute_weight(x)))
        weight, bias = self.packed_weight(x.dtype, pack_side(x.numel() // x.shape[-1])), self.compute_bias(x)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.to(x.dtype), weight, bias, "add")


def add(residual: Tensor | None, h: Tensor) -> Tensor:
    """residual + h (h alone without a residual)."""
    return h if residual is None else residual + h


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
            self.cond_proj = Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Residual block x + conv(SiLU(GN(conv(SiLU(GN(x))) + W SiLU(temb)))) (He et al. 2016; DDPM's time injection)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h)), x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0 one zero row and column are added at the bottom/right first (the VAE's)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to `size`, the matching skip's size) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

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
