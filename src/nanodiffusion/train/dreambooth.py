"""DreamBooth (Ruiz et al. 2023): fine-tune the whole model on a few images of a new concept, with prior preservation.

Before training, the frozen base model samples class images for the class prompts (Sec. 3.3); training then
minimises L(instance images) + lambda * L(class images), so the model keeps what it drew for the class while
it learns the instance. The result is a diffusers-style model folder (checkpoints.save_diffusers) carrying the
base model's VAE, tokenizer and settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def prior_preservation_loss(instance: torch.Tensor, prior: torch.Tensor, weight: float) -> torch.Tensor:
    """DreamBooth's class-specific prior-preservation loss (Ruiz et al. 2023, eq. 2): L_instance + lambda L_prior."""
    return instance + weight * prior


class PriorPreservationObjective(nn.Module):
    """Any objective on the instance batch plus lambda times the same objective on the class batch (`prior_*`)."""

    def __init__(self, objective: nn.Module, weight: float = 1.0):
        super().__init__()
        self.objective = objective
        self.weight = weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        instance = {k: v for k, v in batch.items() if not k.startswith("prior_")}
        prior = {k.removeprefix("prior_"): v for k, v in batch.items() if k.startswith("prior_")}
        instance_loss, logs = self.objective(instance)
        prior_loss, _ = self.objective(prior)
        loss = prior_preservation_loss(instance_loss, prior_loss, self.weight)
        return loss, {**logs, "instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}


def generate_class_images(pipe: Pipeline, prompts: tuple[str, ...], n: int, folder: Path, steps: int,
                          seed: int) -> Path:
    """The prior-preservation images (Ruiz et al. 2023, Sec. 3.3): n samples of the frozen base model, cycling
    through the class prompts; images already in the folder are kept, so a resumed run does not redo them."""
    from ..images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            prompt = prompts[i % len(prompts)]
            save_png(pipe(prompt, steps=steps, seed=seed + i)[0], path)
            path.with_suffix(".txt").write_text(prompt + "\n")
    return folder


def scheduler_config(pipe: Pipeline) -> dict:
    """The pipeline's noise schedule as a diffusers scheduler_config.json dict."""
    s = pipe.schedule
    return {"num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start, "beta_end": s.beta_end,
            "beta_schedule": s.beta_schedule, "rescale_betas_zero_snr": s.rescale_zero_terminal_snr,
            "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset,
            "set_alpha_to_one": s.set_alpha_to_one, "prediction_type": pipe.prediction, "clip_sample": False}


def save_model_folder(pipe: Pipeline, unet: nn.Module, text_encoder: nn.Module, folder: Path,
                      base: Path | None, name: str) -> Path:
    """A diffusers-style folder of the fine-tuned networks with the base's VAE, tokenizer and settings (shown
    under `name`), written to a temporary folder and renamed into place."""
    from ..checkpoints import Checkpoint, has_tokenizer, save_diffusers
    from ..models.word_tokenizer import WordTokenizer

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_dir = base / "tokenizer" if base is not None and base.is_dir() else None
    models = {"unet": unet, "vae": pipe.vae, "text_encoder": text_encoder,
              **({"layout": pipe.layout} if pipe.layout is not None else {})}
    save_diffusers(Checkpoint(
        parts={name: {k: v.detach().float().cpu() for k, v in m.state_dict().items()} for name, m in models.items()},
        configs={name: m.config.to_dict() for name, m in models.items()}, scheduler=scheduler_config(pipe),
        info={"version": "v2" if text_encoder.config.hidden_size == 1024 else "v1"},
        tokenizer_dir=tokenizer_dir if tokenizer_dir is not None and has_tokenizer(tokenizer_dir) else None), tmp)
    index = json.loads((tmp / "model_index.json").read_text())
    if isinstance(pipe.tokenizer, WordTokenizer):
        pipe.tokenizer.save(tmp / "tokenizer")
        index["tokenizer"] = ["nanodiffusion", "WordTokenizer"]
    index["_nanodiffusion"] = {"name": name, "default_size": pipe.default_size,
                               "default_cfg": pipe.default_cfg, "clip_skip": pipe.clip_skip}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
