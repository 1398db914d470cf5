"""The Stable Diffusion UNet: eps_theta(z_t, t, c), a UNet (Ronneberger et al. 2015) of ResNet levels with
spatial transformers cross-attending to the text context c (LDM, Rombach et al. 2022, §3.3). SDXL's UNet is the
same network with another config: transformer depth per level and the added "text_time" conditioning
(pooled text embedding + size / crop time ids, Podell et al. 2023, §2.2).

Config fields and state_dict keys are diffusers' UNet2DConditionModel's, so a diffusers `unet/` folder
loads with `UNetConfig.from_dict(config_json)` and `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NanoDiffusionError, choice_error
from .attention import Transformer2DModel
from .resnet import DownBlock2D, MidBlock2D, TimestepEmbedding, UpBlock2D, timestep_embedding

DOWN_BLOCKS = ["CrossAttnDownBlock2D", "DownBlock2D"]
UP_BLOCKS = ["CrossAttnUpBlock2D", "UpBlock2D"]
MID_BLOCKS = ["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"]
ADDITION_EMBED_TYPES = ["text_time"]   # or None: no added conditioning


@dataclass
class UNetConfig:
    """diffusers' UNet2DConditionModel config.json fields (defaults are diffusers'); unknown keys are ignored.
    As in diffusers, attention_head_dim is the number of heads per level when num_attention_heads is None."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    only_cross_attention: bool | list[bool] = False
    mid_block_only_cross_attention: bool | None = None
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int | list[int] = 2
    downsample_padding: int = 1
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | list[int] = 1
    attention_head_dim: int | list[int] = 8
    num_attention_heads: int | list[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None                    # "text_time": SDXL's added conditioning
    addition_time_embed_dim: int | None = None                # width of each time id's sinusoidal embedding
    projection_class_embeddings_input_dim: int | None = None  # pooled text width + time ids x addition_time_embed_dim
    time_cond_proj_dim: int | None = None                     # an LCM's guidance-scale embedding width (w-conditioning)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Config from a diffusers config.json dict; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A config.json dict that diffusers' UNet2DConditionModel.from_config accepts."""
        return {"_class_name": "UNet2DConditionModel", **dataclasses.asdict(self)}

    @classmethod
    def sd15(cls, **overrides) -> UNetConfig:
        """Stable Diffusion 1.x (in_channels=9 for the inpainting model)."""
        return cls(cross_attention_dim=768, attention_head_dim=8, **overrides)

    @classmethod
    def sd21(cls, **overrides) -> UNetConfig:
        """Stable Diffusion 2.x (768-v): linear projections, 64-wide heads, OpenCLIP context, fp32 attention."""
        return cls(**{"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                      "use_linear_projection": True, "upcast_attention": True, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        """A small SD-shaped UNet for tests and toys."""
        return cls(**{"sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1,
                      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 8,
                      "cross_attention_dim": 32, "attention_head_dim": 2, **overrides})

    @classmethod
    def sdxl(cls, **overrides) -> UNetConfig:
        """SDXL base (Podell et al. 2023, §2.1): three levels, transformer depths 1 / 2 / 10 with 64-wide heads, the
        2048-wide context of both text encoders, the pooled 1280 embedding and six time ids as added conditioning
        (in_channels=9 for the inpainting model)."""
        return cls(**{"sample_size": 128, "block_out_channels": [320, 640, 1280],
                      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                      "cross_attention_dim": 2048, "use_linear_projection": True,
                      "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                      "projection_class_embeddings_input_dim": 1280 + 6 * 256, **overrides})

    @classmethod
    def sdxl_refiner(cls, **overrides) -> UNetConfig:
        """The SDXL refiner (§2.5): four levels of 384 to 1536 channels, depth 4, the bigG context only, and five
        time ids (original size, crop, aesthetic score) beside the pooled embedding."""
        return cls(**{"sample_size": 128, "block_out_channels": [384, 768, 1536, 1536],
                      "down_block_types": ["DownBlock2D", *["CrossAttnDownBlock2D"] * 2, "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", *["CrossAttnUpBlock2D"] * 2, "UpBlock2D"],
                      "transformer_layers_per_block": 4, "attention_head_dim": [6, 12, 24, 24],
                      "cross_attention_dim": 1280, "use_linear_projection": True,
                      "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                      "projection_class_embeddings_input_dim": 1280 + 5 * 256, **overrides})


def per_block(value, n: int, name: str) -> list:
    """A per-level setting: an int/bool repeated n times, or a list of length n."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise NanoDiffusionError(f"UNet config {name} has {len(value)} entries but there are {n} levels; "
                                 f"give one per block_out_channels entry")
    return list(value)


def check_config(c: UNetConfig) -> None:
    """Clear errors for configs this UNet cannot build."""
    n = len(c.block_out_channels)
    if len(c.down_block_types) != n or len(c.up_block_types) != n:
        raise NanoDiffusionError(f"UNet config needs {n} down_block_types and up_block_types "
                                 f"(one per block_out_channels entry)")
    for kind, choices in [*((k, DOWN_BLOCKS) for k in c.down_block_types), *((k, UP_BLOCKS) for k in c.up_block_types)]:
        if kind not in choices:
            raise choice_error("UNet block type", kind, choices)
    if c.mid_block_type is not None and c.mid_block_type not in MID_BLOCKS:
        raise choice_error("UNet mid_block_type", c.mid_block_type, MID_BLOCKS)
    if c.act_fn not in ("silu", "swish"):
        raise choice_error("UNet act_fn", c.act_fn, ["silu"])
    if not isinstance(c.cross_attention_dim, int):
        raise NanoDiffusionError("UNet config cross_attention_dim must be one int (per-level dims are not supported)")
    heads = per_block(c.num_attention_heads or c.attention_head_dim, n, "attention_head_dim")
    for channels, h in zip(c.block_out_channels, heads):
        if channels % h:
            raise NanoDiffusionError(f"UNet level of {channels} channels cannot split into {h} attention heads; "
                                     f"pick attention_head_dim dividing block_out_channels")
    if c.addition_embed_type is not None and c.addition_embed_type not in ADDITION_EMBED_TYPES:
        raise choice_error("UNet addition_embed_type", c.addition_embed_type, ADDITION_EMBED_TYPES)
    if c.addition_embed_type and not (c.addition_time_embed_dim and c.projection_class_embeddings_input_dim):
        raise NanoDiffusionError("UNet config addition_embed_type=\"text_time\" needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")


class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, c): conv_in -> down levels (skips kept) -> mid -> up levels (skips concatenated) -> conv_out,
    every resnet fed the timestep embedding, every spatial transformer the context c (LDM §3.3).
    forward is embed, encode (down to the bottleneck), the up levels, head; approximations that run parts of it
    (nanodiffusion.fast.deepcache) call those steps."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        check_config(config)
        self.config = c = config
        ch, n = list(c.block_out_channels), len(c.block_out_channels)
        heads = per_block(c.num_attention_heads or c.attention_head_dim, n, "attention_head_dim")
        layers = per_block(c.layers_per_block, n, "layers_per_block")
        depth = per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        only_cross = per_block(c.only_cross_attention, n, "only_cross_attention")
        mid_only_cross = c.mid_block_only_cross_attention
        if mid_only_cross is None:
            mid_only_cross = isinstance(c.only_cross_attention, bool) and c.only_cross_attention
        temb = 4 * ch[0]
        block = dict(temb_channels=temb, groups=c.norm_num_groups, eps=c.norm_eps)

        def attention(level: int, use: bool, cross_only: bool):
            """Spatial-transformer factory for one level, or None for a level without attention."""
            return partial(Transformer2DModel, heads=heads[level], context_dim=c.cross_attention_dim,
                           groups=c.norm_num_groups, depth=depth[level], linear=c.use_linear_projection,
                           only_cross=cross_only, upcast=c.upcast_attention) if use else None

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb, c.time_cond_proj_dim)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(ch[max(i - 1, 0)], ch[i], layers[i], add_downsample=i < n - 1,
                        downsample_padding=c.downsample_padding,
                        attention=attention(i, kind == "CrossAttnDownBlock2D", only_cross[i]), **block)
            for i, kind in enumerate(c.down_block_types))
        cross_mid = c.mid_block_type == "UNetMidBlock2DCrossAttn"  # else one plain resnet (diffusers' UNetMidBlock2D)
        self.mid_block = None if c.mid_block_type is None else MidBlock2D(
            ch[-1], attention=attention(n - 1, cross_mid, mid_only_cross), num_layers=int(cross_mid), **block)
        self.up_blocks = nn.ModuleList(
            UpBlock2D(ch[min(level + 1, n - 1)], ch[level], [ch[level]] * layers[level] + [ch[max(level - 1, 0)]],
                      add_upsample=i < n - 1,
                      attention=attention(level, kind == "CrossAttnUpBlock2D", only_cross[level]), **block)
            for i, (level, kind) in enumerate(zip(reversed(range(n)), c.up_block_types)))
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor, *,
                text_embeds: Tensor | None = None, time_ids: Tensor | None = None, timestep_cond: Tensor | None = None,
                down_block_additional_residuals: list[Tensor] | None = None,
                mid_block_additional_residual: Tensor | None = None) -> Tensor:
        """Noise prediction for `sample` [B, C, H, W] at `timestep` (scalar or [B]) given the context [B, L, D].
        An SDXL UNet also takes the pooled text embedding `text_embeds` [B, P] and the size / crop `time_ids`
        [B, N] (sdxl.py); a guidance-distilled (LCM) UNet its guidance-scale embedding `timestep_cond` [B, W]
        (guidance.guidance_scale_embedding). The additional residuals (a ControlNet's) are added to the skips and to
        the mid-block output."""
        emb = self.embed(sample, timestep, text_embeds, time_ids, timestep_cond)
        h, skips = self.encode(sample, emb, encoder_hidden_states, down_block_additional_residuals,
                               mid_block_additional_residual)
        for block in self.up_blocks:
            h = block(h, emb, encoder_hidden_states, skips)
        return self.head(h)

    def embed(self, sample: Tensor, timestep: Tensor | float, text_embeds: Tensor | None = None,
              time_ids: Tensor | None = None, timestep_cond: Tensor | None = None) -> Tensor:
        """The timestep embedding [B, 4 * C] (plus SDXL's added embedding), in the sample's dtype."""
        c = self.config
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift),
                                  timestep_cond)
        if c.addition_embed_type is not None or text_embeds is not None or time_ids is not None:
            emb = emb + self.added_embedding(text_embeds, time_ids)
        return emb.to(sample.dtype)   # the sinusoid and its MLP in float32 (precision.py)

    def encode(self, sample: Tensor, emb: Tensor, context: Tensor, down_residuals: list[Tensor] | None = None,
               mid_residual: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """conv_in, the down levels and the mid block: the bottleneck features and the skips (the additional
        residuals added to them)."""
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips += block_skips
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise NanoDiffusionError(f"got {len(down_residuals)} down-block residuals, the UNet has "
                                         f"{len(skips)} skips; use a ControlNet built for this UNet")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual
        return h, skips

    def head(self, h: Tensor) -> Tensor:
        """The output of the last up level -> the prediction: GroupNorm, SiLU, conv_out."""
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def added_embedding(self, text_embeds: Tensor | None, time_ids: Tensor | None) -> Tensor:
        """SDXL's micro-conditioning (Podell et al. 2023, §2.2): every time id (original size, crop, target size or
        aesthetic score) through the timestep sinusoid, concatenated after the pooled text embedding, through an
        MLP whose output is added to the timestep embedding."""
        c = self.config
        if c.addition_embed_type is None:
            raise NanoDiffusionError("this UNet takes no added conditioning (text_embeds / time_ids); "
                                     "pass them to SDXL UNets only")
        if text_embeds is None or time_ids is None:
            raise NanoDiffusionError("an SDXL UNet needs text_embeds (the pooled text embedding) and time_ids "
                                     "(size and crop conditioning): build them with nanodiffusion.sdxl")
        ids = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        features = torch.cat([text_embeds.float(), ids.reshape(text_embeds.shape[0], -1)], dim=-1)
        if features.shape[1] != c.projection_class_embeddings_input_dim:
            raise NanoDiffusionError(f"the UNet's added conditioning takes {c.projection_class_embeddings_input_dim} "
                                     f"features, got {features.shape[1]} ({text_embeds.shape[1]} pooled + "
                                     f"{time_ids.shape[1]} time ids x {c.addition_time_embed_dim}): a base model "
                                     "takes 6 time ids, the refiner 5 (with an aesthetic score)")
        return self.add_embedding(features)
