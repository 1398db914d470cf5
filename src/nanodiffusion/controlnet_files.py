"""ControlNet inputs from disk: the model files people share, and the control image.

Two layouts are in circulation for SD 1.x / 2.x ControlNets (SDXL ControlNets mostly ship as diffusers folders or
diffusers-named single files; in the original layout their added conditioning is `label_emb`, as in the UNet):
- a diffusers ControlNetModel folder: config.json + diffusion_pytorch_model.safetensors, our names as they are;
- the original single file (lllyasviel's ControlNet, `control_sd15_*.pth`, `control_v11*.safetensors`): the
  copied encoder in ldm names under `control_model.` (`input_blocks`, `middle_block`, `time_embed`), the zero
  convolutions `zero_convs.N.0`, `middle_block_out.0`, and the conditioning embedding `input_hint_block.K`
  (convs at even K, SiLUs between). Some files leave out the `control_model.` prefix; full-model files hold
  the whole SD checkpoint next to it, whose other keys are ignored.
The encoder goes through the UNet key table of checkpoint_keys; the ControlNet's own layers get a few rows more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint_configs import infer_encoder_config
from .checkpoint_keys import Entry, KeyTable, UNetLayout, count_indices, has_prefix, split_prefix, unet_table
from .checkpoints import (
    DIFFUSERS_VERSION,
    METADATA_KEY,
    load_into,
    load_state_dict,
    part_weights,
    read_json,
    read_metadata,
    version_from_unet,
)
from .errors import NanoDiffusionError
from .models.controlnet import ControlNetConfig, ControlNetModel
from .packing import packed_layers

ORIGINAL_PREFIX = "control_model."
ENCODER = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
WEIGHTS = "diffusion_pytorch_model.safetensors"


# ---- Key table ----

def controlnet_table(layout: UNetLayout, skips: int, hint_blocks: int) -> KeyTable:
    """diffusers ControlNetModel <-> original ControlNet names: the UNet table's encoder rows, the zero
    convolutions, and the conditioning embedding (input_hint_block: convs at 0, 2, ..., conv_out last)."""
    entries = [e for e in unet_table(layout).entries if e.diffusers.startswith(ENCODER)]
    entries += [Entry(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(skips)]
    entries.append(Entry("controlnet_mid_block.", "middle_block_out.0."))
    entries.append(Entry("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))
    entries += [Entry(f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * j + 2}.")
                for j in range(hint_blocks)]
    entries.append(Entry("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * hint_blocks + 2}."))
    return KeyTable(entries)


def table_for(sd: dict[str, Tensor], *, original: bool) -> KeyTable:
    """The ControlNet table sized from a state dict in either naming (without the control_model. prefix)."""
    if original:
        return controlnet_table(UNetLayout.from_original(sd), count_indices(sd, "zero_convs."),
                                (count_indices(sd, "input_hint_block.") - 1) // 2 - 1)
    return controlnet_table(UNetLayout.from_diffusers(sd), count_indices(sd, "controlnet_down_blocks."),
                            count_indices(sd, "controlnet_cond_embedding.blocks."))


def original_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An original ControlNet file's tensors (with or without control_model.) in diffusers names."""
    control = split_prefix(sd, ORIGINAL_PREFIX) or sd
    return table_for(control, original=True).convert(control, to_original=False, part="ControlNet")


def diffusers_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of original_to_diffusers, written under control_model. as the original files are."""
    original = table_for(sd, original=False).convert(sd, to_original=True, part="ControlNet")
    return {ORIGINAL_PREFIX + key: t for key, t in original.items()}


def diffusers_names(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """A single file's ControlNet tensors in diffusers names, whichever layout it uses."""
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return sd
    if has_prefix(sd, ORIGINAL_PREFIX + "input_hint_block.") or has_prefix(sd, "input_hint_block."):
        return original_to_diffusers(sd)
    raise NanoDiffusionError(f"{path}: not a ControlNet (no control_model.* nor controlnet_cond_embedding.* "
                             "weights); pass a ControlNet .safetensors / .pth file or a diffusers ControlNet folder")


# ---- Config from shapes ----

def infer_controlnet_config(sd: dict[str, Tensor]) -> dict:
    """ControlNetModel config from the tensor shapes (diffusers names): the copied encoder's as for a UNet
    (checkpoint_configs.infer_encoder_config), the conditioning embedding's widths."""
    hint = [sd["controlnet_cond_embedding.conv_in.weight"]] + [
        sd[f"controlnet_cond_embedding.blocks.{j}.weight"]
        for j in range(1, count_indices(sd, "controlnet_cond_embedding.blocks."), 2)]
    mid_attention = has_prefix(sd, "mid_block.attentions.")
    return {"_class_name": "ControlNetModel", **infer_encoder_config(sd, version_from_unet(sd), "ControlNet"),
            "conditioning_channels": hint[0].shape[1],
            "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attention else "UNetMidBlock2D",
            "conditioning_embedding_out_channels": [t.shape[0] for t in hint]}


# ---- Load and save ----

def load_controlnet(path: str | Path) -> ControlNetModel:
    """A ControlNet from a diffusers folder (config.json + weights; a pipeline folder's controlnet/ too) or an
    original single file (config inferred from the shapes, or read from our own metadata)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "controlnet" if (path / "controlnet" / "config.json").is_file() else path
        config = read_json(folder / "config.json")
        sd = load_state_dict(part_weights(folder))
    else:
        sd = diffusers_names(load_state_dict(path), path)
        config = read_metadata(path).get("controlnet") or infer_controlnet_config(sd)
    model = ControlNetModel(ControlNetConfig.from_dict(config))
    load_into(model, sd, "ControlNet")
    return packed_layers(model.eval())   # the CPU fast path, as the loader gives the UNet (packing.py)


def save_controlnet(model: ControlNetModel, path: str | Path) -> None:
    """Write a diffusers ControlNet folder, or (path ending in .safetensors) one original-layout file whose
    metadata carries our config."""
    path = Path(path)
    sd = {k: t.detach().contiguous() for k, t in model.state_dict().items()}
    config = model.config.to_dict()
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(diffusers_to_original(sd), path, metadata={METADATA_KEY: json.dumps({"controlnet": config})})
        return
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**config, "_diffusers_version": DIFFUSERS_VERSION}, indent=2))
    save_file(sd, path / WEIGHTS)


# ---- The control image ----

def prepare_control_image(image: Image.Image, width: int, height: int) -> Tensor:
    """Control image -> [1, 3, height, width] in [0, 1]: Lanczos resize, RGB, /255, no shift to [-1, 1]
    (as diffusers' ControlNet pipelines feed it)."""
    image = image.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
