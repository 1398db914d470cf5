"""A tiny random text-to-image Pipeline (word tokenizer, 2-level UNet and VAE) for fast pipeline tests."""

from __future__ import annotations

import torch

from nanodiffusion.models.clip import CLIPTextConfig, CLIPTextModel
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from nanodiffusion.models.vae import AutoencoderKL, VAEConfig
from nanodiffusion.models.word_tokenizer import WordTokenizer
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.schedules import NoiseSchedule


def tiny_pipeline(size: int = 32, words: str = "a red blue circle square above below", max_length: int = 12,
                  text_layers: int = 2) -> Pipeline:
    """Random weights (seed 0), default image size `size`, a vocabulary of `words`."""
    torch.manual_seed(0)
    tokenizer = WordTokenizer.build([words], model_max_length=max_length)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=text_layers, num_attention_heads=2,
                                        max_position_embeddings=max_length))
    unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=size // 2))
    vae = AutoencoderKL(VAEConfig.from_dict(dict(block_out_channels=[16, 32], norm_num_groups=8,
                                                 down_block_types=["DownEncoderBlock2D"] * 2,
                                                 up_block_types=["UpDecoderBlock2D"] * 2)))
    for model in (text, unet, vae):
        model.eval().requires_grad_(False)
    return Pipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, schedule=NoiseSchedule(),
                    name="tiny", model_hash="0123456789", default_size=size)
