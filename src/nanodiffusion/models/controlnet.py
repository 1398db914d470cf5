"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet encoder that sees a control image
(edges, depth, a layout mask) and adds its features to the frozen UNet's skips through zero convolutions.

    c_f = E(c_i)                                    conditioning embedding: a small conv net, image -> latent size
    y_c = F(x; Theta) + Z(F(x + Z(c_f; Theta_z1); Theta_c); Theta_z2)     (§3.1, eq. 2)

F(.; Theta_c) is the encoder + mid block copied from the UNet, Z a 1x1 convolution initialised to zero, so at the
start of training the ControlNet adds exactly nothing. Config fields and state_dict keys are diffusers'
ControlNetModel's, so a diffusers ControlNet folder loads with no key map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NanoDiffusionError, choice_error
from .unet import UNet2DConditionModel, UNetConfig, per_block

SHARED_FIELDS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                 "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "act_fn",
                 "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
                 "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention",
                 "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
UP_BLOCK_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
CHANNEL_ORDERS = ["rgb", "bgr"]


@dataclass
class ControlNetConfig:
    """diffusers' ControlNetModel config.json fields (defaults are diffusers'); unknown keys are ignored.
    The UNet-shaped fields mean what they mean in UNetConfig and must match the base model's."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | list[bool] = False
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int | list[int] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | list[int] = 1
    attention_head_dim: int | list[int] = 8
    num_attention_heads: int | list[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    global_pool_conditions: bool = False
    addition_embed_type: str | None = None                    # "text_time": an SDXL ControlNet (UNetConfig's)
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        """Config from a diffusers config.json dict; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A config.json dict that diffusers' ControlNetModel.from_config accepts."""
        return {"_class_name": "ControlNetModel", **dataclasses.asdict(self)}

    @classmethod
    def from_unet_config(cls, unet: UNetConfig, **overrides) -> ControlNetConfig:
        """The ControlNet for a base UNet: its encoder's settings (as diffusers' ControlNetModel.from_unet)."""
        return cls(**{name: getattr(unet, name) for name in SHARED_FIELDS}, **overrides)

    def unet_config(self) -> UNetConfig:
        """The UNet whose encoder this ControlNet copies (the decoder settings mirror the encoder and go unused)."""
        if self.mid_block_scale_factor != 1:
            raise NanoDiffusionError(f"ControlNet config mid_block_scale_factor={self.mid_block_scale_factor} is "
                                     "not supported (Stable Diffusion uses 1)")
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise choice_error("ControlNet channel order", self.controlnet_conditioning_channel_order, CHANNEL_ORDERS)
        up = [UP_BLOCK_OF.get(kind, kind) for kind in reversed(self.down_block_types)]
        return UNetConfig(**{name: getattr(self, name) for name in SHARED_FIELDS}, up_block_types=up)


def zero_conv(channels: int) -> nn.Conv2d:
    """Z(.; Theta_z): a 1x1 convolution with weight and bias initialised to zero (§3.1)."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetConditioningEmbedding(nn.Module):
    """E(c_i): 3x3 convs with SiLU, a stride-2 conv per step of `channels`, down to the latent size (§3.2);
    the last conv is zero-initialised."""

    def __init__(self, out_channels: int, in_channels: int, channels: list[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels, channels[1:]):
            self.blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, image: Tensor) -> Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def unet_encoder(config: UNetConfig) -> UNet2DConditionModel:
    """A freshly initialised UNet without its decoder: built on the meta device (no memory), the decoder
    dropped, the encoder and mid block materialised and given their default initialisation."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
    del unet.up_blocks, unet.conv_norm_out, unet.conv_out
    unet.to_empty(device="cpu")
    for module in unet.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return unet


class ControlNetModel(nn.Module):
    """The trainable copy F(.; Theta_c) of the UNet encoder and mid block, fed x + Z(E(c_i)); its skips and
    mid-block output, each through a zero convolution and times the control scale, are the UNet's extra residuals.
    An SDXL ControlNet copies the added conditioning too and takes the UNet's text_embeds / time_ids."""

    embed = UNet2DConditionModel.embed   # the UNet's timestep (+ SDXL added) embedding, on the copied layers
    added_embedding = UNet2DConditionModel.added_embedding

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = c = config
        unet = unet_encoder(c.unet_config())
        ch = c.block_out_channels
        self.conv_in, self.time_embedding = unet.conv_in, unet.time_embedding
        if c.addition_embed_type is not None:
            self.add_embedding = unet.add_embedding
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(ch[0], c.conditioning_channels,
                                                                         c.conditioning_embedding_out_channels)
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        skips = [ch[0]] + [width for block, width in zip(self.down_blocks, ch)
                           for _ in range(len(block.resnets) + len(block.downsamplers))]
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(n) for n in skips)
        self.controlnet_mid_block = zero_conv(ch[-1])

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, **overrides) -> ControlNetModel:
        """A ControlNet initialised from a trained UNet: its encoder and mid block copied, Theta_c <- Theta (§3.1)."""
        controlnet = cls(ControlNetConfig.from_unet_config(unet.config, **overrides))
        for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
            if getattr(unet, name, None) is not None:
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor, controlnet_cond: Tensor,
                conditioning_scale: float = 1.0, *, text_embeds: Tensor | None = None,
                time_ids: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """The residuals for the UNet's skips and mid block, given the latents, timestep, text context (SDXL: and
        the added conditioning) and the control image [B, conditioning_channels, 8H, 8W] in [0, 1]."""
        c = self.config
        if c.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        emb = self.embed(sample, timestep, text_embeds, time_ids)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips += block_skips
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states)
        down = [zero(s) * conditioning_scale for s, zero in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h) * conditioning_scale
        if c.global_pool_conditions:
            down, mid = [r.mean(dim=(2, 3), keepdim=True) for r in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def check_base(unet: UNetConfig, controlnet: ControlNetConfig) -> None:
    """A ControlNet only fits the base model whose encoder it copied: same context width, levels and skips."""
    def shape(c: UNetConfig | ControlNetConfig) -> str:
        levels = len(c.block_out_channels)
        return (f"in_channels={c.in_channels}, cross_attention_dim={c.cross_attention_dim}, "
                f"block_out_channels={list(c.block_out_channels)}, "
                f"layers_per_block={per_block(c.layers_per_block, levels, 'layers_per_block')}")

    if shape(unet) != shape(controlnet):
        raise NanoDiffusionError(f"the ControlNet is for another base model: ControlNet {shape(controlnet)} but "
                                 f"the model's UNet has {shape(unet)}; use a ControlNet trained for this model")


def controlnet_unet(unet: UNet2DConditionModel, controlnet: ControlNetModel, image: Tensor,
                    scale: float = 1.0) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The UNet steered by a ControlNet, as the denoiser calls it: net(x, t, context, **added) -> prediction (added:
    SDXL's text_embeds and time_ids, for both networks; an LCM's timestep_cond, for the UNet as diffusers does).
    `image` [1 or B, C, 8H, 8W] is repeated to the batch (classifier-free guidance runs [uncond, cond] at once,
    both halves with the control image, as diffusers does without guess mode)."""
    check_base(unet.config, controlnet.config)

    def net(x: Tensor, t: Tensor, context: Tensor, **added: Tensor) -> Tensor:
        cond = image.to(x).repeat(x.shape[0] // image.shape[0], 1, 1, 1)
        sdxl = {k: v for k, v in added.items() if k in ("text_embeds", "time_ids")}   # not an LCM's timestep_cond
        down, mid = controlnet(x, t, context, cond, scale, **sdxl)
        return unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid, **added)

    return net
