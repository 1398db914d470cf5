"""Latent consistency distillation (LCM, Luo et al. 2023; consistency distillation, Song et al. 2023, Alg. 2):
distil a text-to-image pipeline folder (the built-in model, or an SD 1.x diffusers folder) into a student UNet
that samples in 1-4 steps with `samplers.sample_lcm`.

The loss is train/consistency.py's on the VAE latents of the training images, with LCM's three choices:
- the teacher is guided: D_w = D(x; empty) + w (D(x; c) - D(x; empty)) at one fixed scale w (the teacher's
  default cfg), so the student learns the guided ODE and samples at cfg 1 (LCM's fixed-w variant: no
  w-embedding, the student's UNet has the teacher's architecture and starts as a copy of it);
- one DDIM (= Euler) teacher step over a skipping grid: t = 0 and the k-th timesteps k - 1, 2k - 1, ..., 999 with
  k = 1000 / 50 = 20, the grid LCMScheduler samples on (schedules.lcm_timesteps);
- the boundary scalings over timesteps (consistency.lcm_scalings), which make the student's denoiser its
  consistency function from t = 19 on; the target network theta- is an EMA of the student (decay 0.95).
A model with a layout stage (models/layout.py) gives teacher, target and student one slot map per image: painted
from the scene's true boxes for the shapes scenes (as stage 2 trained it), else sampled from the caption; the
teacher's unconditional branch sees a blank map, as at generation. The student folder is the teacher's with the
new UNet, default cfg 1 and `_class_name: LCMScheduler` in its scheduler config.

    nanodiff train lcm runs/builtin/layout/model --output runs/lcm --threads 1   # 1000 steps, batch 16
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..denoisers import Denoiser
from ..errors import NanoDiffusionError
from ..guidance import cfg_denoiser
from ..schedules import LCM_ORIGINAL_STEPS, NoiseSchedule, lcm_timesteps
from .args import add_common_arguments, config_from_args
from .consistency import LCM_TIMESTEP_SCALING, ConsistencyDistillation, DenoiserFn, lcm_scalings
from .data import batch_indices, open_dataset
from .loop import Batch, TrainConfig, config_dict, train

if TYPE_CHECKING:
    from ..pipeline import Pipeline

LCM_RECIPE = {"steps": 1000, "batch_size": 16, "lr": 1e-4, "warmup": 50, "mixed_precision": "no",
              "checkpoint_every": 100, "preview_every": 400}
TARGET_DECAY = 0.95      # theta- (LCM's EMA target)
SHIPPED_DECAY = 0.99     # the loop's EMA of the student, the weights that ship
STUDENT_STEPS = 4        # preview


def lcm_sigmas(schedule: NoiseSchedule, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """The skipping grid (Luo et al. 2023, sec. 4.3), increasing: sigma at t = 0 and at LCMScheduler's
    `original_steps` timesteps (every k-th, k = T / original_steps)."""
    t = torch.cat([torch.zeros(1, dtype=torch.float64), lcm_timesteps(original_steps, schedule.num_train_timesteps)])
    return schedule.train_sigmas[t.long()].sort().values


def guided_teacher(denoiser: DenoiserFn, uncond_context: torch.Tensor, scale: float) -> DenoiserFn:
    """D_w(x, sigma; c) = D(x, sigma; empty) + w (D(x, sigma; c) - D(x, sigma; empty)), one fixed w (Luo et al. 2023,
    sec. 4.2): the unconditional branch sees the empty prompt and, with a layout stage, a blank slot map."""

    def guided(x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        uncond = {"context": uncond_context.expand_as(cond["context"]),
                  **({"layout": torch.zeros_like(cond["layout"])} if "layout" in cond else {})}
        return cfg_denoiser(denoiser, cond, uncond, scale)(x, sigma)

    return guided


def unet_denoiser(pipe: Pipeline, unet: nn.Module) -> Denoiser:
    """D(x, sigma; context[, layout]) of `unet` in the pipeline's place (its schedule, prediction, layout channels)."""
    return Denoiser(replace(pipe, unet=unet).unet_function(None, 1.0, 0, 0), pipe.schedule, pipe.prediction)


def slot_map(layout: nn.Module, context: torch.Tensor, boxes: torch.Tensor | None, height: int,
             width: int) -> torch.Tensor:
    """The layout stage's map of each image: painted from its true boxes, or from boxes sampled from its text."""
    if boxes is not None:
        return layout.paint(boxes, layout.read_slots(context), height, width)
    noise = torch.randn(len(context), layout.config.slots, 4, device=context.device)
    return layout(context, noise, height, width)


class LatentConsistencyObjective(nn.Module):
    """The LCM loss of a batch of cached latents. The student and its target theta- are the submodules (DDP wraps
    the student; checkpoints carry both); the teacher and the frozen text encoder / layout stage stay outside, in
    closures (`distill.teacher`, `condition`), so the loop's copies of the objective never copy them."""

    def __init__(self, distill: ConsistencyDistillation, condition: Callable[[Batch], dict[str, torch.Tensor]]):
        super().__init__()
        self.student, self.target = distill.student, distill.target.model
        self.distill, self.condition = distill, condition

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """E || f_theta(x_{n+1}, t_{n+1}) - f_theta-(x^_n, t_n) ||^2 for x0 a posterior sample of each image."""
        scale = batch["scaling_factor"].view(-1, 1, 1, 1)
        x0 = (batch["mean"] + batch["std"] * torch.randn_like(batch["mean"])) * scale
        return self.distill.loss(x0, **self.condition(batch)), {}

    def update_target(self, step: int) -> None:
        """theta- <- mu theta- + (1 - mu) theta after optimizer step `step` (the EMA's warm-up counted from the
        step itself, so a resumed run updates exactly as an uninterrupted one)."""
        self.distill.target.step = step
        self.distill.update_target()


def load_teacher(folder: Path) -> Pipeline:
    """The teacher pipeline (float32 compute) of a pipeline folder."""
    from ..pipeline import Pipeline

    if not (Path(folder) / "model_index.json").is_file():
        raise NanoDiffusionError(f"{folder} is not a pipeline folder (no model_index.json): pass the folder a "
                                 "trainer wrote (RUN/model) or an SD 1.x diffusers folder")
    return Pipeline.load(folder, precision="float32")


def mark_lcm(folder: Path, original_steps: int = LCM_ORIGINAL_STEPS) -> None:
    """Label a written folder as an LCM model: scheduler _class_name LCMScheduler (and its grid), default cfg 1."""
    config_file, index_file = folder / "scheduler" / "scheduler_config.json", folder / "model_index.json"
    scheduler = {**json.loads(config_file.read_text()), "_class_name": "LCMScheduler",
                 "original_inference_steps": original_steps, "timestep_scaling": LCM_TIMESTEP_SCALING}
    config_file.write_text(json.dumps(scheduler, indent=2) + "\n")
    index = json.loads(index_file.read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    settings = {k: v for k, v in index.get("_nanodiffusion", {}).items() if k != "default_layout_cfg"}
    index["_nanodiffusion"] = {**settings, "default_cfg": 1.0}   # one pass per step: no guidance of either kind
    index_file.write_text(json.dumps(index, indent=2) + "\n")


def train_lcm(config: TrainConfig, model_folder: Path, *, data: str | None = None, dataset_size: int = 20_000,
              cfg: float | None = None, target_decay: float = TARGET_DECAY) -> Path:
    """Distil the pipeline folder `model_folder` into a few-step student; writes output/model (a pipeline folder)."""
    from ..images import image_grid
    from .diffusion import cache_latents, preview_prompts
    from .dreambooth import save_model_folder
    from .finetune import latent_batch

    if not 0 <= target_decay <= 1:
        raise NanoDiffusionError(f"--target-decay {target_decay} is not allowed: use a number from 0 to 1")
    pipe = load_teacher(Path(model_folder))
    scale = pipe.default_cfg if cfg is None else cfg
    dataset = open_dataset(data, size=pipe.default_size, length=dataset_size, seed=config.seed)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    cache = cache_latents(pipe.vae, dataset, output / "latents.pt")
    ids = pipe.tokenizer(cache["captions"])
    boxes = torch.tensor([dataset.boxes(i) for i in range(len(dataset))]) if hasattr(dataset, "boxes") else None
    with torch.no_grad():
        uncond_context = pipe.text_encoder(pipe.tokenizer([""]))

    teacher = guided_teacher(unet_denoiser(pipe, pipe.unet), uncond_context, scale)
    student = copy.deepcopy(pipe.unet).train().requires_grad_(True)   # initialised from the teacher
    distill = ConsistencyDistillation(teacher, student,
                                      lambda unet: unet_denoiser(pipe, unet), lcm_sigmas(pipe.schedule),
                                      ema_decay=target_decay, scalings=lcm_scalings(pipe.schedule))

    @torch.no_grad()
    def condition(batch: Batch) -> dict[str, torch.Tensor]:
        context = pipe.text_encoder(batch["input_ids"])
        if pipe.layout is None:
            return {"context": context}
        return {"context": context, "layout": slot_map(pipe.layout, context, batch.get("boxes"),
                                                       *batch["mean"].shape[-2:])}

    objective = LatentConsistencyObjective(distill, condition)
    scaling = float(pipe.vae.config.scaling_factor)

    def batches(step: int, micro: int, rank: int, world: int) -> Batch:
        if micro == 0 and step > 0:   # the optimizer step before this one is done: theta- follows it
            objective.update_target(step - 1)
        i = batch_indices(len(ids), config.batch_size, config.seed, step, micro, rank)
        batch = latent_batch(cache, ids, i, scaling)
        return batch if boxes is None else {**batch, "boxes": boxes[i]}

    def student_pipeline(trained: nn.Module) -> Pipeline:
        return replace(pipe, unet=trained.student, default_cfg=1.0, name=f"{pipe.name}-lcm")

    def preview(trained: nn.Module, path: Path) -> None:
        prompts = preview_prompts(cache["captions"])
        student_pipe = student_pipeline(trained)
        images = [student_pipe(p, steps=STUDENT_STEPS, sampler="lcm", cfg=1.0, seed=i)[0]
                  for i, p in enumerate(prompts)]
        image_grid(images, columns=len(images) // 2).save(path)
        path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")

    def finish(trained: nn.Module, output: Path) -> None:
        student_pipe = student_pipeline(trained)
        folder = save_model_folder(student_pipe, trained.student, pipe.text_encoder, output / "model",
                                   Path(model_folder), student_pipe.name)
        mark_lcm(folder)
        record = {**config_dict(config), "teacher": str(model_folder), "cfg": scale, "target_decay": target_decay,
                  "grid": f"t = 0 and every {pipe.schedule.num_train_timesteps // LCM_ORIGINAL_STEPS}th timestep",
                  "dataset_size": dataset_size, "data": data}
        (output / "lcm_config.json").write_text(json.dumps(record, indent=2) + "\n")

    train(objective, batches, config, preview=preview, finish=finish)
    return output / "model"


def main(argv: list[str] | None = None) -> Path:
    """`nanodiff train lcm MODEL ...` / `python -m nanodiffusion.train.lcm MODEL ...`."""
    parser = argparse.ArgumentParser(prog="nanodiff train lcm",
                                     description="distil a pipeline folder into a 1-4 step LCM student")
    parser.add_argument("model", help="the teacher: a pipeline folder (RUN/model, or an SD 1.x diffusers folder)")
    add_common_arguments(parser, "runs/lcm", LCM_RECIPE)
    parser.set_defaults(ema_decay=SHIPPED_DECAY)
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance scale folded into the teacher (default: the teacher's default cfg)")
    parser.add_argument("--target-decay", type=float, default=TARGET_DECAY, help="EMA decay of the target theta-")
    args = parser.parse_args(argv)
    folder = train_lcm(config_from_args(args), Path(args.model), data=args.data, dataset_size=args.dataset_size,
                       cfg=args.cfg, target_decay=args.target_decay)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
