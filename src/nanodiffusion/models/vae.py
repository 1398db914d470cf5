"""The Stable Diffusion autoencoder (AutoencoderKL): image x -> encoder -> q(z|x) = N(mean, diag(var)) -> z ->
decoder -> x' (LDM, Rombach et al. 2022, §3 and App. G; Kingma & Welling 2014).

Config fields and state_dict keys are diffusers' AutoencoderKL's (encoder.mid_block.attentions.0.to_q, ...).
Latents fed to the diffusion model are (z - shift_factor) * scaling_factor: 0.18215 and no shift for SD 1.x / 2.x;
SD3's 16-channel autoencoder (no quant convs) has scaling_factor 1.5305 and shift_factor 0.0609.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NanoDiffusionError, choice_error
from .attention import Attention, from_tokens, to_tokens
from .resnet import DownBlock2D, MidBlock2D, UpBlock2D

EPS = 1e-6  # every GroupNorm of the VAE


@dataclass
class VAEConfig:
    """diffusers' AutoencoderKL config.json fields (defaults are diffusers'); unknown keys are ignored."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list[str] = field(default_factory=lambda: ["DownEncoderBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpDecoderBlock2D"])
    block_out_channels: list[int] = field(default_factory=lambda: [64])
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    shift_factor: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Config from a diffusers config.json dict; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A config.json dict that diffusers' AutoencoderKL.from_config accepts."""
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}

    @classmethod
    def sd(cls, **overrides) -> VAEConfig:
        """The SD 1.x / 2.x autoencoder: 8x downsampling to 4 latent channels."""
        return cls(**{"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                      "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
                      **overrides})


def check_config(c: VAEConfig) -> None:
    """Clear errors for configs this autoencoder cannot build."""
    n = len(c.block_out_channels)
    if len(c.down_block_types) != n or len(c.up_block_types) != n:
        raise NanoDiffusionError(f"VAE config needs {n} down_block_types and up_block_types "
                                 f"(one per block_out_channels entry)")
    for kind, choice in [*((k, "DownEncoderBlock2D") for k in c.down_block_types),
                         *((k, "UpDecoderBlock2D") for k in c.up_block_types)]:
        if kind != choice:
            raise choice_error("VAE block type", kind, [choice])
    if c.act_fn not in ("silu", "swish"):
        raise choice_error("VAE act_fn", c.act_fn, ["silu"])


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), logvar clamped to [-30, 20]."""

    def __init__(self, parameters: Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps drawn on the generator's device (the CPU by default) for reproducibility."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The most likely latent, the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over all but the batch dimension."""
        return 0.5 * (self.mean.pow(2) + self.std.pow(2) - 1.0 - self.logvar).flatten(1).sum(1)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the H*W positions with GroupNorm in front and a residual (the mid blocks')."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, EPS)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x + from_tokens(super().forward(to_tokens(self.group_norm(x))), x.shape[-2:])


def mid_block(c: VAEConfig) -> MidBlock2D:
    """resnet, self-attention, resnet at the lowest resolution."""
    attention = (lambda ch: SpatialSelfAttention(ch, c.norm_num_groups)) if c.mid_block_add_attention else None
    return MidBlock2D(c.block_out_channels[-1], None, c.norm_num_groups, EPS, attention=attention)


class Encoder(nn.Module):
    """x -> conv_in -> resnet levels with stride-2 downsampling -> mid block -> GN, SiLU, conv to 2*latent channels."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, n = c.block_out_channels, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(ch[max(i - 1, 0)], ch[i], c.layers_per_block, None, c.norm_num_groups, EPS,
                        add_downsample=i < n - 1, downsample_padding=0) for i in range(n))
        self.mid_block = mid_block(c)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[-1], EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    """z -> conv_in -> mid block -> levels of resnets with 2x upsampling -> GN, SiLU, conv to image channels."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, n = c.block_out_channels, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = mid_block(c)
        self.up_blocks = nn.ModuleList(
            UpBlock2D(ch[min(level + 1, n - 1)], ch[level], [0] * (c.layers_per_block + 1), None, c.norm_num_groups,
                      EPS, add_upsample=level > 0) for level in reversed(range(n)))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], EPS)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder: encode(x) -> DiagonalGaussian over z, decode(z) -> x."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        check_config(config)
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) for images x in [-1, 1], [B, in_channels, H, W]."""
        h = self.encoder(x)
        return DiagonalGaussian(h if self.quant_conv is None else self.quant_conv(h))

    def decode(self, z: Tensor) -> Tensor:
        """Images in about [-1, 1] from autoencoder latents z (unscale_latents of diffusion latents)."""
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def scale_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents (z - shift_factor) * scaling_factor from autoencoder latents z."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """Autoencoder latents z = latents / scaling_factor + shift_factor, for decode."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def forward(self, x: Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction decode(z), z sampled from q(z|x) or its mean."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())
