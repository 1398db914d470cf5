"""Configs inferred from a checkpoint's tensor shapes (diffusers / transformers config.json keys), for single files
without metadata: the UNet (SD 1.x / 2.x / SDXL), SD3's MMDiT, the VAEs, the CLIP text encoders and T5."""

from __future__ import annotations

import math

from torch import Tensor

from . import sd3, sdxl
from .checkpoint_keys import PROJECTION, count_indices, has_prefix
from .errors import NanoDiffusionError

SDXL_VERSIONS = ("xl", "xl-refiner")


def infer_config(part: str, sd: dict[str, Tensor], version: str) -> dict:
    """The config.json for one part, inferred from its state dict."""
    if part.startswith("text_encoder") and part != "text_encoder_3":
        return infer_text_config(sd, version, part)
    return {"unet": infer_unet_config, "transformer": infer_mmdit_config, "vae": infer_vae_config,
            "text_encoder_3": infer_t5_config}[part](sd, version)


def infer_unet_config(sd: dict[str, Tensor], version: str) -> dict:
    """UNet config from shapes: its encoder's (infer_encoder_config), the decoder mirroring it."""
    config = {"_class_name": "UNet2DConditionModel", **infer_encoder_config(sd, version, "UNet"),
              "out_channels": sd["conv_out.weight"].shape[0], "sample_size": 64,
              "up_block_types": ["CrossAttnUpBlock2D" if has_prefix(sd, f"up_blocks.{i}.attentions.") else "UpBlock2D"
                                 for i in range(count_indices(sd, "down_blocks."))]}
    if config.get("addition_embed_type"):
        config["sample_size"] = sdxl.DEFAULT_SIZE // 8
    return config


def infer_encoder_config(sd: dict[str, Tensor], version: str, part: str) -> dict:
    """The config of a UNet's encoder (the UNet's or a ControlNet's copy of it) from shapes. Head counts are not in
    the shapes: SD 1.x uses 8 heads, SD 2.x and XL heads of width 64 (diffusers' attention_head_dim = heads per
    level, [5, 10, 20, 20]). SDXL adds its "text_time" conditioning: 256-wide sinusoids of the time ids (Podell
    et al. 2023, §2.2)."""
    levels = count_indices(sd, "down_blocks.")
    channels = [sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    down = [has_prefix(sd, f"down_blocks.{i}.attentions.") for i in range(levels)]
    proj_in = next((t for k, t in sd.items() if k.endswith("proj_in.weight")), None)
    context = next((t.shape[1] for k, t in sd.items() if k.endswith("attn2.to_k.weight")), None)
    if proj_in is None or context is None:
        raise NanoDiffusionError(f"the {part} has no cross-attention: not a text-to-image Stable Diffusion "
                                 f"{'checkpoint' if part == 'UNet' else part}")
    config = {"in_channels": sd["conv_in.weight"].shape[1],
              "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down],
              "block_out_channels": channels, "layers_per_block": count_indices(sd, "down_blocks.0.resnets."),
              "cross_attention_dim": context, "use_linear_projection": proj_in.ndim == 2,
              "attention_head_dim": [c // 64 for c in channels] if version in ("v2", *SDXL_VERSIONS) else 8,
              "transformer_layers_per_block": transformer_depths(sd, down), "norm_num_groups": 32}
    if "add_embedding.linear_1.weight" in sd:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=sd["add_embedding.linear_1.weight"].shape[1])
    return config


def transformer_depths(sd: dict[str, Tensor], attention: list[bool]) -> int | list[int]:
    """Transformer blocks per level (SDXL: 1 / 2 / 10), one int when every attention level and the mid block
    agree; levels without attention take 1, the last level the mid block's depth (which diffusers reads there)."""
    mid = count_indices(sd, "mid_block.attentions.0.transformer_blocks.")
    depths = [count_indices(sd, f"down_blocks.{i}.attentions.0.transformer_blocks.") if a else None
              for i, a in enumerate(attention)]
    if len({d for d in depths if d is not None} | {mid}) == 1:
        return mid
    return [d if d is not None else 1 for d in depths[:-1]] + [mid]


def infer_mmdit_config(sd: dict[str, Tensor], version: str) -> dict:
    """SD3 / SD3.5's MMDiT config from shapes. Heads are 64 wide, as in every published model (SD3.5's QK-norm weights
    give the width); the position grid is square; QK RMSNorm (SD3.5) and the dual-attention blocks (SD3.5 medium's
    attn2) show in the names."""
    patches = sd["pos_embed.proj.weight"]                         # [inner, in_channels, patch, patch]
    norm = sd.get("transformer_blocks.0.attn.norm_q.weight")
    head = norm.shape[0] if norm is not None else 64
    patch, grid = patches.shape[2], math.isqrt(sd["pos_embed.pos_embed"].shape[1])
    layers = count_indices(sd, "transformer_blocks.")
    return {"_class_name": "SD3Transformer2DModel", "sample_size": min(sd3.SAMPLE_SIZE, grid * patch),
            "patch_size": patch, "in_channels": patches.shape[1], "num_layers": layers, "attention_head_dim": head,
            "num_attention_heads": patches.shape[0] // head,
            "joint_attention_dim": sd["context_embedder.weight"].shape[1],
            "caption_projection_dim": sd["context_embedder.weight"].shape[0],
            "pooled_projection_dim": sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
            "out_channels": sd["proj_out.weight"].shape[0] // patch ** 2, "pos_embed_max_size": grid,
            "qk_norm": "rms_norm" if norm is not None else None,
            "dual_attention_layers": [i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd]}


def infer_vae_config(sd: dict[str, Tensor], version: str) -> dict:
    """AutoencoderKL config from shapes; latents are scaled by 0.18215 (SD 1.x / 2.x), SDXL's by 0.13025, SD3's
    16 channels shifted by 0.0609 and scaled by 1.5305 (SD3's VAE has no quant_conv / post_quant_conv)."""
    if version == "sd3":
        return {**infer_vae_config(sd, "custom"), "use_quant_conv": "quant_conv.weight" in sd,
                "use_post_quant_conv": "post_quant_conv.weight" in sd, **sd3.VAE_SETTINGS}
    levels = count_indices(sd, "encoder.down_blocks.")
    return {"_class_name": "AutoencoderKL", "sample_size": 512,
            "in_channels": sd["encoder.conv_in.weight"].shape[1],
            "out_channels": sd["decoder.conv_out.weight"].shape[0],
            "latent_channels": sd["decoder.conv_in.weight"].shape[1],
            "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]
                                   for i in range(levels)],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": count_indices(sd, "encoder.down_blocks.0.resnets."), "norm_num_groups": 32,
            "scaling_factor": 0.18215, **(sdxl.VAE_SETTINGS if version in SDXL_VERSIONS else {})}


def infer_text_config(sd: dict[str, Tensor], version: str, part: str = "text_encoder") -> dict:
    """CLIPTextModel config from shapes: heads of width 64; OpenAI CLIP (v1, XL's and SD3's first encoder) uses
    quick_gelu, OpenCLIP (v2, XL's and SD3's bigG: text_encoder_2) gelu; with a text_projection (XL's bigG, both of
    SD3's), a CLIPTextModelWithProjection."""
    tokens = sd["text_model.embeddings.token_embedding.weight"]
    projection = sd.get(PROJECTION + "weight")
    open_clip = version == "v2" or part == "text_encoder_2"
    if projection is not None:
        without = {k: t for k, t in sd.items() if k != PROJECTION + "weight"}
        return {**infer_text_config(without, "v2" if open_clip else "v1"),
                "architectures": ["CLIPTextModelWithProjection"], "projection_dim": projection.shape[0]}
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": tokens.shape[0], "hidden_size": tokens.shape[1],
            "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0],
            "num_hidden_layers": count_indices(sd, "text_model.encoder.layers."),
            "num_attention_heads": tokens.shape[1] // 64,
            "hidden_act": "gelu" if version == "v2" else "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 512 if version == "v2" else 768, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}


def infer_t5_config(sd: dict[str, Tensor], version: str) -> dict:
    """SD3's T5 v1.1 encoder (T5-XXL) config from shapes: the relative position bias [buckets, heads] gives the heads,
    a gated wi_0 the gated-GELU feed-forward; the bias's maximum distance (128) is not in the shapes."""
    tokens = sd["shared.weight"]
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = sd[f"{attention}relative_attention_bias.weight"].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    inner = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")]
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": tokens.shape[0],
            "d_model": tokens.shape[1], "d_kv": sd[f"{attention}q.weight"].shape[0] // heads, "d_ff": inner.shape[0],
            "num_layers": count_indices(sd, "encoder.block."), "num_heads": heads,
            "relative_attention_num_buckets": buckets, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu" if gated else "relu"}
