"""Build a Pipeline from a checkpoint on disk: the built-in model, a diffusers folder or a single file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoints import Checkpoint, load_checkpoint, load_into, model_hash
from .errors import NanoDiffusionError
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.tokenizers import load_tokenizer
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .schedules import NoiseSchedule

BUILTIN = Path(__file__).parent / "weights" / "builtin"


def build_models(ckpt: Checkpoint) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Instantiate the three networks from their configs and load their weights (strict)."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(ckpt.configs["unet"]))
    vae = AutoencoderKL(VAEConfig.from_dict(ckpt.configs["vae"]))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(ckpt.configs["text_encoder"]))
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        load_into(model, ckpt.parts[part], part)
        model.eval().requires_grad_(False)
    return unet, vae, text_encoder


def nanodiffusion_settings(folder: Path) -> dict:
    """Our own defaults stored in model_index.json under "_nanodiffusion" (diffusers ignores "_" keys)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    return json.loads(index.read_text(encoding="utf-8")).get("_nanodiffusion", {})


def load_pipeline(cls: type, path: str | Path | None = None, *, tokenizer: str | Path | None = None,
                  prediction: str | None = None):
    """Read a checkpoint, build its networks, tokenizer and noise schedule into `cls` (a Pipeline)."""
    source = BUILTIN if path is None else Path(path)
    if path is None and not (BUILTIN / "model_index.json").is_file():
        raise NanoDiffusionError(f"the built-in model is missing from {BUILTIN}: reinstall nanodiffusion "
                                 "or pass --model PATH")
    if not source.exists():
        raise NanoDiffusionError(f"model {source} does not exist: pass a diffusers folder or a "
                                 ".safetensors / .ckpt file")
    ckpt = load_checkpoint(source, prediction=prediction)
    unet, vae, text_encoder = build_models(ckpt)
    version = ckpt.info.get("version")
    pad = "!" if version == "v2" and tokenizer is None and ckpt.tokenizer_dir is None else None
    tok = load_tokenizer(tokenizer or ckpt.tokenizer_dir, pad_with=pad)
    tok.model_max_length = min(tok.model_max_length, text_encoder.config.max_position_embeddings)
    settings = nanodiffusion_settings(source) if source.is_dir() else {}
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        return cls(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
            schedule=NoiseSchedule.from_config(ckpt.scheduler),
            prediction=prediction or ckpt.scheduler.get("prediction_type", "epsilon"),
            name=settings.get("name", source.stem if source.is_file() else source.name),
            model_hash=model_hash(source),
            default_size=settings.get("default_size", unet.config.sample_size * vae_scale),
            default_cfg=settings.get("default_cfg", 7.0),
            clip_skip=settings.get("clip_skip", 1),
        )
