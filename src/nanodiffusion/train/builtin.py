"""The built-in model: latent diffusion with a learned layout stage at toy scale, and the folder it ships as.

64x64 RGB scenes -> VAE (4x down) -> 16x16x4 latents; a 3-layer CLIP text transformer over the shapes
vocabulary, a layout stage (models/layout.py) that places each named object, and a small cross-attention UNet
that reads the latents and the layout's slot map. See docs/builtin.md.

    nanodiff train builtin train --output runs/builtin    # the three stages, then ship (docs/builtin.md)
    nanodiff train builtin ship runs/builtin/layout/model  # ship a trained pipeline folder as fp16
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..data.captions import COLORS, SHAPES
from .save import save_module

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "weights" / "builtin"
MAX_TOKENS = 24

BUILTIN_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 1.0,
}

BUILTIN_TEXT_ENCODER = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "projection_dim": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}

BUILTIN_UNET = {
    "sample_size": 16,
    "in_channels": 4 + 16,  # latents + the layout stage's slot map
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 128, 192],
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
}

# The layout stage (models/layout.py): slot reader, box flow model, slot map of 16 channels the UNet reads beside
# its 4 latent channels (the UNet's in_channels become 4 + map_channels). Slot attributes: colour (or "any colour"
# where the prompt leaves it open) and shape.
BUILTIN_LAYOUT = {"slots": 4, "dim": 128, "heads": 4, "slot_layers": 2, "box_layers": 3, "map_channels": 16,
                  "sharpness": 100.0, "sample_steps": 24, "slot_classes": [len(COLORS) + 1, len(SHAPES)]}

# Stable Diffusion's training schedule (scaled-linear betas 0.00085 -> 0.012 over 1000 steps), epsilon target.
BUILTIN_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}

# Guidance scale the shipped model is tuned for on the validation split (docs/builtin.md), read by the loader as
# the default --cfg. Layout guidance (--layout-cfg, guidance.LayoutGuidance) is off by default: on the validation
# split it did not beat plain CFG (docs/builtin.md, experiment I).
BUILTIN_CFG = 3.0
# Captioned training images whose UNet reads the slot map beside the empty prompt's text states, so the model also
# learns D(map), the middle term of LayoutGuidance (InstructPix2Pix trains its image-only branch the same way). Off
# in the recipe: the model trained without it guides as well (docs/builtin.md, experiment H); --map-only-prob.
MAP_ONLY_PROB = 0.0

# Training settings of the two stages (also the defaults of `nanodiff train vae` / `diffusion`).
# The UNet trains in fp32: on the CPU it was measured faster than under bf16 autocast.
VAE_RECIPE = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup": 100, "mixed_precision": "bf16",
              "checkpoint_every": 500, "preview_every": 500}
DIFFUSION_RECIPE = {"steps": 5000, "batch_size": 32, "lr": 3e-4, "warmup": 200, "mixed_precision": "no",
                    "checkpoint_every": 200, "preview_every": 500}
LAYOUT_RECIPE = {"steps": 2000, "batch_size": 512, "lr": 1e-3, "warmup": 100, "mixed_precision": "no",
                 "checkpoint_every": 1000, "preview_every": 0}


def write_pipeline_folder(folder: Path, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                          tokenizer: object, scheduler: dict, dtype: torch.dtype = torch.float32,
                          name: str = "model", layout: nn.Module | None = None,
                          default_cfg: float = BUILTIN_CFG, default_layout_cfg: float | None = None) -> Path:
    """A diffusers-style folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, and
    layout/ for a model with a layout stage."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout is not None:
        save_module(layout, layout.config.to_dict(), folder / "layout", "diffusion_pytorch_model.safetensors", dtype)
    save_module(unet, unet.config.to_dict(), folder / "unet", "diffusion_pytorch_model.safetensors", dtype)
    save_module(vae, vae.config.to_dict(), folder / "vae", "diffusion_pytorch_model.safetensors", dtype)
    save_module(text_encoder, text_encoder.config.to_dict(), folder / "text_encoder", "model.safetensors", dtype)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    tokenizer.save(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_nanodiffusion": {"name": name, "default_size": vae.config.sample_size,
                           "default_cfg": default_cfg,
                           **({"default_layout_cfg": default_layout_cfg} if default_layout_cfg is not None else {})},
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["nanodiffusion", "WordTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        **({"layout": ["nanodiffusion", "LayoutModel"]} if layout is not None else {}),
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def load_pipeline_parts(folder: Path) -> tuple[nn.Module, nn.Module, nn.Module, object, nn.Module | None]:
    """Read back (unet, vae, text_encoder, tokenizer, layout or None) from a folder written by
    `write_pipeline_folder`."""
    from safetensors.torch import load_file

    from ..models.clip import CLIPTextConfig, CLIPTextModel
    from ..models.layout import LayoutConfig, LayoutModel
    from ..models.unet import UNet2DConditionModel, UNetConfig
    from ..models.vae import AutoencoderKL, VAEConfig
    from ..models.word_tokenizer import WordTokenizer

    folder = Path(folder)
    parts = []
    for name, config_cls, model_cls, filename in (
            ("unet", UNetConfig, UNet2DConditionModel, "diffusion_pytorch_model.safetensors"),
            ("vae", VAEConfig, AutoencoderKL, "diffusion_pytorch_model.safetensors"),
            ("text_encoder", CLIPTextConfig, CLIPTextModel, "model.safetensors"),
            ("layout", LayoutConfig, LayoutModel, "diffusion_pytorch_model.safetensors")):
        if not (folder / name).is_dir():
            parts.append(None)
            continue
        config = json.loads((folder / name / "config.json").read_text())
        model = model_cls(config_cls.from_dict(config))
        model.load_state_dict({k: v.float() for k, v in load_file(folder / name / filename).items()})
        parts.append(model.eval())
    unet, vae, text_encoder, layout = parts
    return unet, vae, text_encoder, WordTokenizer.load(folder / "tokenizer"), layout


def ship(source: Path, destination: Path = BUILTIN_DIR, name: str = "builtin") -> Path:
    """Copy a trained pipeline folder into the package as fp16 safetensors (the built-in model; its few-step
    student: name "builtin-lcm", into weights/builtin_lcm), keeping the folder's own default guidance."""
    unet, vae, text_encoder, tokenizer, layout = load_pipeline_parts(source)
    scheduler = json.loads((Path(source) / "scheduler" / "scheduler_config.json").read_text())
    shutil.rmtree(Path(destination) / "layout", ignore_errors=True)
    return write_pipeline_folder(destination, unet, vae, text_encoder, tokenizer, scheduler, torch.float16,
                                 name=name, layout=layout, **guidance_settings(source))


def guidance_settings(folder: Path) -> dict:
    """A pipeline folder's own default guidance (model_index.json), as write_pipeline_folder's keyword arguments."""
    settings = json.loads((Path(folder) / "model_index.json").read_text()).get("_nanodiffusion", {})
    return {"default_cfg": settings.get("default_cfg", BUILTIN_CFG),
            "default_layout_cfg": settings.get("default_layout_cfg")}


def train_builtin(output: Path, *, vae_steps: int = VAE_RECIPE["steps"],
                  diffusion_steps: int = DIFFUSION_RECIPE["steps"], layout_steps: int = LAYOUT_RECIPE["steps"],
                  dataset_size: int = 20_000, threads: int | None = None, ship_to: Path | None = BUILTIN_DIR) -> Path:
    """The whole recipe: stage 1 (VAE), stage 2 (UNet + text encoder + layout stage), stage 3 (the layout stage's
    slot reader and box flow model alone), then ship the EMA weights as fp16."""
    from .diffusion import train_diffusion
    from .layout import train_layout
    from .loop import TrainConfig
    from .vae import train_vae

    output = Path(output)
    train_vae(TrainConfig(output=output / "vae", threads=threads, **{**VAE_RECIPE, "steps": vae_steps}),
              dataset_size=dataset_size)
    train_diffusion(TrainConfig(output=output / "diffusion", threads=threads,
                                **{**DIFFUSION_RECIPE, "steps": diffusion_steps}), output / "vae" / "vae",
                    dataset_size=dataset_size)
    model = train_layout(TrainConfig(output=output / "layout", threads=threads,
                                     **{**LAYOUT_RECIPE, "steps": layout_steps}),
                         output / "diffusion" / "model", dataset_size=dataset_size)
    return ship(model, ship_to) if ship_to is not None else model


def main(argv: list[str] | None = None) -> None:
    """`python -m nanodiffusion.train.builtin train|ship ...` (also `nanodiff train builtin ...`)."""
    parser = argparse.ArgumentParser(prog="nanodiff train builtin", description="train or ship the built-in model")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="the three stages end to end, then ship (resumes if interrupted)")
    train.add_argument("--output", default="runs/builtin", help="run folder (vae/ and diffusion/ inside)")
    train.add_argument("--vae-steps", type=int, default=VAE_RECIPE["steps"])
    train.add_argument("--diffusion-steps", type=int, default=DIFFUSION_RECIPE["steps"])
    train.add_argument("--layout-steps", type=int, default=LAYOUT_RECIPE["steps"])
    train.add_argument("--dataset-size", type=int, default=20_000, help="number of synthetic shapes scenes")
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--ship-to", default=str(BUILTIN_DIR), help="where the fp16 model goes ('' to skip)")
    copy = sub.add_parser("ship", help="copy a trained pipeline folder into the package as fp16")
    copy.add_argument("source", help="pipeline folder written by `nanodiff train diffusion` (RUN/model)")
    copy.add_argument("destination", nargs="?", default=str(BUILTIN_DIR))
    copy.add_argument("--name", default="builtin", help="the model's name (the few-step student: builtin-lcm)")
    args = parser.parse_args(argv)
    if args.action == "ship":
        print(ship(Path(args.source), Path(args.destination), args.name))
    else:
        print(train_builtin(Path(args.output), vae_steps=args.vae_steps, diffusion_steps=args.diffusion_steps,
                            layout_steps=args.layout_steps, dataset_size=args.dataset_size, threads=args.threads,
                            ship_to=Path(args.ship_to) if args.ship_to else None))


if __name__ == "__main__":
    main()
