"""Which prediction type a checkpoint was trained for, and why we think so.

Diffusers folders say it in scheduler_config.json. Original single files do not: SD 1.x files are all epsilon;
SD 2.x files are either the 768-v model (v-prediction) or the 512-base / inpainting models (epsilon). Like the
popular web UI (AUTOMATIC1111, modules/sd_models_config.py), we ask the UNet once: at t = 999 on a flat latent
x = 0.5 with a flat context 0.5, an epsilon model predicts noise close to its (nearly pure-noise) input, while a
v model predicts v = alpha eps - sigma x0 ~ -x0, far below it; mean(F(x) - x) < -1 means v-prediction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .models.unet import UNet2DConditionModel, UNetConfig
from .storage import uninitialised

if TYPE_CHECKING:
    from .checkpoints import Checkpoint

PROBE_TIMESTEP = 999.0
PROBE_VALUE = 0.5
PROBE_THRESHOLD = -1.0


@torch.no_grad()
def unet_predicts_v(unet: nn.Module) -> bool:
    """The one-call probe: mean(F(x, 999, c) - x) < -1 on x = c = 0.5 (an 8x8 latent, 2 context tokens)."""
    config = unet.config
    x = torch.full((1, config.in_channels, 8, 8), PROBE_VALUE)
    context = torch.full((1, 2, config.cross_attention_dim), PROBE_VALUE)
    out = unet(x, torch.tensor([PROBE_TIMESTEP]), context).float()
    return float((out - x[:, : out.shape[1]]).mean()) < PROBE_THRESHOLD


def unet_of(ckpt: "Checkpoint") -> UNet2DConditionModel:
    """The checkpoint's UNet in float32, its parameters taken from the state dict (built uninitialised)."""
    with uninitialised():
        unet = UNet2DConditionModel(UNetConfig.from_dict(ckpt.configs["unet"]))
    unet.load_state_dict({k: t.float() for k, t in ckpt.parts["unet"].items()}, assign=True)
    return unet.eval()


def choose_prediction(ckpt: "Checkpoint", unet: nn.Module | None = None) -> tuple[str, str]:
    """(prediction type, why): the folder's config, or for an SD 2.x single file the probe of its UNet (built
    from the checkpoint when not given); 9-channel SD 2.x files are the epsilon 512 inpainting model."""
    if not (ckpt.info.get("inferred") and ckpt.info.get("version") == "v2"):
        source = "SD 1.x single files are epsilon" if ckpt.info.get("inferred") else "the scheduler config"
        return ckpt.scheduler.get("prediction_type", "epsilon"), f"from {source}"
    if ckpt.info.get("inpainting"):
        return "epsilon", "SD 2.x inpainting single file (the 512 inpainting model is epsilon)"
    if unet_predicts_v(unet if unet is not None else unet_of(ckpt)):
        return "v_prediction", "SD 2.x single file: the UNet probe answers like the 768-v model"
    return "epsilon", "SD 2.x single file: the UNet probe answers like the 512-base model"
