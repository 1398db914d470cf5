"""LoRA fine-tuning (Hu et al. 2021): the diffusion loss through trainable low-rank branches of a frozen model.

Each target layer W of the UNet (and, optionally, of the text encoder) computes h = W x + (alpha / r) B A x
(models/lora.py); only A and B train, and the result is saved as a kohya-layout file with its ss_* metadata.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models.lora import LoRANetwork
from .diffusion import DiffusionObjective
from .loop import TrainConfig

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .finetune import FinetuneSettings

BASE_VERSIONS = {768: "sd_v1", 1024: "sd_v2"}  # text encoder width -> kohya's ss_base_model_version


@contextmanager
def lora_applied(network: LoRANetwork, weight: float = 1.0):
    """Run the network's targets with their LoRA branches (unmerged) inside the block."""
    network.apply_unmerged(weight)
    try:
        yield network
    finally:
        network.remove()


class LoRAObjective(nn.Module):
    """The diffusion loss of a frozen model through trainable LoRA branches (Hu et al. 2021, eq. 3).

    The branches are hooked in for each forward only, so the EMA copy (a deep copy of this module) runs
    its own averaged branches on its own copy of the model.
    """

    def __init__(self, objective: DiffusionObjective, network: LoRANetwork):
        super().__init__()
        self.objective = objective.requires_grad_(False)
        self.network = network.requires_grad_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with lora_applied(self.network):
            return self.objective(batch)


def base_model_version(pipe: Pipeline) -> str:
    """kohya's ss_base_model_version for the pipeline's text encoder ("nanodiffusion" for the built-in model)."""
    if pipe.is_sdxl:
        return "sdxl_base_v1-0"
    return BASE_VERSIONS.get(pipe.text_encoder.config.hidden_size, "nanodiffusion")


def lora_metadata(pipe: Pipeline, config: TrainConfig, settings: FinetuneSettings, n_images: int,
                  data: object) -> dict:
    """kohya-style training metadata (ss_* fields) for the LoRA file's header."""
    return {"ss_output_name": Path(config.output).name, "ss_sd_model_name": pipe.name,
            "ss_new_sd_model_hash": pipe.model_hash, "ss_max_train_steps": config.steps,
            "ss_learning_rate": config.lr, "ss_unet_lr": config.lr,
            "ss_text_encoder_lr": config.lr if settings.train_text_encoder else 0,
            "ss_num_train_images": n_images, "ss_num_reg_images": settings.num_class_images,
            "ss_prior_loss_weight": settings.prior_weight,
            "ss_resolution": f"({pipe.default_size}, {pipe.default_size})",
            "ss_seed": config.seed, "ss_min_snr_gamma": settings.snr_gamma, "ss_dataset_dir": str(data),
            "ss_training_comment": settings.instance_prompt or "per-image captions"}
