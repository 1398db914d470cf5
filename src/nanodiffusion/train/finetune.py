"""Fine-tuning a trained model on a few captioned images: LoRA, and DreamBooth with prior preservation.

Both minimise the diffusion loss of stage 2 (diffusion.py) on the new images' cached latents, on the shared
accelerate loop (loop.py: checkpoints, resume, EMA, LR schedule, CSV log, previews):
- LoRA (Hu et al. 2021): the model stays frozen; only the low-rank branches h = W x + (alpha / r) B A x of
  its attention layers (and optionally of its text encoder) train. Output: one kohya-layout .safetensors
  file, applied at run time with `nanodiff generate --lora FILE:WEIGHT`.
- DreamBooth (Ruiz et al. 2023): the whole UNet (and optionally the text encoder) trains. Prior preservation
  (Sec. 3.3) first generates class images with the frozen base model, then trains on
  L = L(instance images) + lambda * L(class images), so the model learns the new concept without forgetting
  what it already draws. Output: a diffusers-style model folder, loaded with `--model FOLDER`.
Prior preservation works for LoRA too (kohya's "regularisation images"). A model with a layout stage (the built-in
one) keeps it frozen and is fine-tuned on the slot map of each image's boxes from metadata.jsonl (docs/finetune.md).
Re-running with the same output folder resumes from its last checkpoint.

    nanodiff finetune lora --data my-images --output runs/my-lora --steps 300
    nanodiff finetune dreambooth --data my-images --instance-prompt "a sks shape" \
        --class-prompt "a shape" --num-class-images 50 --output runs/my-dreambooth
"""

from __future__ import annotations

import argparse
import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from ..errors import NanoDiffusionError, choice_error
from ..models.lora import LoRANetwork, create_lora
from .args import add_common_arguments, config_from_args
from .data import batch_indices, open_dataset
from .diffusion import DiffusionObjective, cache_latents
from .dreambooth import (
    PriorPreservationObjective,
    generate_class_images,
    save_model_folder,
)
from .finetune_lora import (
    LoRAObjective,
    base_model_version,
    lora_applied,
    lora_metadata,
)
from .loop import TrainConfig, config_dict, last_checkpoint, train

if TYPE_CHECKING:
    from ..pipeline import Pipeline

Base = Union["Pipeline", str, Path, None]  # a loaded pipeline, a model path, or None for the built-in model

KINDS = ("lora", "dreambooth")
LEARNING_RATES = {"lora": 5e-3, "dreambooth": 1e-4}  # built-in model (LoRA diverged at 1e-2); SD 1.x: ~1e-4, 5e-6
FINETUNE_RECIPE = {"steps": 300, "batch_size": 8, "lr": None, "warmup": 20, "mixed_precision": "no",
                   "checkpoint_every": 100, "preview_every": 0}


@dataclass
class FinetuneSettings:
    """What to fine-tune and on which prompts (the training schedule itself is a loop.TrainConfig)."""

    kind: str = "lora"
    rank: int = 4
    alpha: float | None = None               # LoRA scale alpha / rank; None: alpha = rank
    conv_rank: int | None = None             # LoCon: also the res blocks' k x k convolutions
    train_text_encoder: bool = False
    instance_prompt: str | None = None       # one prompt for every image ("a sks shape"); None: the captions
    class_prompts: tuple[str, ...] = ()      # prior preservation: prompts of the class images
    num_class_images: int = 0
    prior_weight: float = 1.0                # lambda of the prior-preservation loss
    class_steps: int = 20                    # sampling steps of each class image
    snr_gamma: float = 5.0
    uncond_prob: float = 0.0                 # caption dropout (0: as DreamBooth and kohya by default)
    preview_prompts: tuple[str, ...] = ()     # prompts of the preview grids; (): the first captions


# ---- Data ----

def check_settings(settings: FinetuneSettings) -> None:
    """Refuse inconsistent settings before anything is loaded."""
    if settings.kind not in KINDS:
        raise choice_error("fine-tuning kind", settings.kind, list(KINDS))
    if settings.kind == "lora" and settings.rank < 1:
        raise NanoDiffusionError(f"LoRA rank {settings.rank} is not allowed: use 1 or more (4 to 32 is usual)")
    if settings.num_class_images < 0 or settings.prior_weight < 0:
        raise NanoDiffusionError("--num-class-images and --prior-weight must not be negative")
    if settings.num_class_images and not settings.class_prompts:
        raise NanoDiffusionError("prior preservation needs a class prompt: pass --class-prompt 'a shape' "
                                 "(the class of your concept), or --num-class-images 0 to train without it")


def instance_captions(captions: list[str], instance_prompt: str | None, data: object) -> list[str]:
    """The instance prompt for every image, else each image's own caption (all must have one)."""
    if instance_prompt:
        return [instance_prompt] * len(captions)
    missing = sum(not text for text in captions)
    if missing:
        raise NanoDiffusionError(f"{missing} of {len(captions)} images in {data} have no caption: add .txt files "
                                 "(or metadata.jsonl), or pass --instance-prompt 'a sks shape' for all of them")
    return captions


def slot_boxes(dataset: object, slots: int) -> dict[str, torch.Tensor]:
    """The images' object boxes, from the shapes scenes (dataset.boxes) or a folder's metadata.jsonl
    (dataset.object_boxes), as a layout stage's slot boxes: "boxes" (N, slots, 4) of (present, cx, cy, half side)
    and "has_boxes" (N,); images without boxes get zeros and False."""
    boxes, known = torch.zeros(len(dataset), slots, 4), torch.zeros(len(dataset), dtype=torch.bool)
    for i in range(len(dataset)):
        if hasattr(dataset, "boxes"):
            objects = [box[1:] for box in dataset.boxes(i) if box[0]]
        else:
            objects = dataset.object_boxes(i) if hasattr(dataset, "object_boxes") else None
        if objects is None:
            continue
        if len(objects) > slots:
            raise NanoDiffusionError(f"{dataset.items[i][0]} has {len(objects)} boxes in metadata.jsonl but the "
                                     f"model's layout stage has {slots} object slots: give at most {slots}")
        known[i] = True
        for k, box in enumerate(objects):
            boxes[i, k] = torch.tensor([1.0, *box])
    return {"boxes": boxes, "has_boxes": known}


def latent_batch(cache: dict, ids: torch.Tensor, indices: torch.Tensor, scaling: float) -> dict[str, torch.Tensor]:
    """Posterior mean / std, token ids, VAE scaling (and slot boxes, when the cache has them) of the given cached
    images: what DiffusionObjective reads."""
    return {"mean": cache["mean"][indices].float(), "std": cache["std"][indices].float(), "input_ids": ids[indices],
            "scaling_factor": torch.full((len(indices),), scaling),
            **{key: cache[key][indices] for key in ("boxes", "has_boxes") if key in cache}}


# ---- The run ----

def load_base(base: Base) -> tuple[Pipeline, Path | None]:
    """The base pipeline and its path: a Pipeline object as is, else Pipeline.load(path) (None: the built-in)."""
    from ..loading import BUILTIN
    from ..pipeline import Pipeline

    if isinstance(base, Pipeline):
        return base, None
    return Pipeline.load(base, precision="float32"), BUILTIN if base is None else Path(base)


def run_finetune(base: Base, data: str | Path | None, config: TrainConfig, settings: FinetuneSettings,
                 resume: bool = True) -> Path:
    """Fine-tune `base` (None: the built-in model; a path; or a Pipeline, whose networks DreamBooth trains in
    place) on the captioned images in `data`; returns the LoRA file or the model folder."""
    check_settings(settings)
    output = Path(config.output)
    if not resume and last_checkpoint(output) is not None:
        raise NanoDiffusionError(f"{output} already holds a run's checkpoints: re-run without --no-resume to "
                                 "continue it, or pass another --output")
    pipe, base_path = load_base(base)
    dataset = open_dataset(data, size=pipe.default_size, length=1000, seed=config.seed)  # bad folder: error here
    output.mkdir(parents=True, exist_ok=True)
    config = replace(config, lr=config.lr or LEARNING_RATES[settings.kind])
    instance = cache_latents(pipe.vae, dataset, output / "instance_latents.pt")
    if pipe.layout is not None:
        instance.update(slot_boxes(dataset, pipe.layout.config.slots))
        missing = int((~instance["has_boxes"]).sum())
        if missing:
            warnings.warn(f"{missing} of {len(dataset)} images in {data} have no \"boxes\" in metadata.jsonl: the "
                          "model has a layout stage, so they train without its slot map and teach it little "
                          "(docs/finetune.md); add each image's objects as [centre x, centre y, half side] "
                          "fractions, in its caption's order", stacklevel=2)
    instance_ids = pipe.tokenizer(instance_captions(instance["captions"], settings.instance_prompt, data))
    prior = None
    if settings.num_class_images:
        folder = generate_class_images(pipe, settings.class_prompts, settings.num_class_images,
                                       output / "class_images", settings.class_steps, config.seed)
        prior = cache_latents(pipe.vae, open_dataset(folder, size=pipe.default_size), output / "class_latents.pt")
        prior_ids = pipe.tokenizer(prior["captions"])
    scaling = float(pipe.vae.config.scaling_factor)

    diffusion = DiffusionObjective(pipe.unet, pipe.text_encoder, pipe.schedule.alphas_cumprod,
                                   pipe.tokenizer([""])[0], pipe.prediction, settings.snr_gamma, settings.uncond_prob,
                                   pipe.layout)
    if settings.kind == "lora":
        torch.manual_seed(config.seed)
        parts = {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if settings.train_text_encoder else {})}
        network = create_lora(parts, settings.rank, settings.alpha, conv_rank=settings.conv_rank)
        objective: nn.Module = LoRAObjective(diffusion, network)
    else:
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(settings.train_text_encoder)
        objective = diffusion
    if prior is not None:
        objective = PriorPreservationObjective(objective, settings.prior_weight)

    def batches(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        i = batch_indices(len(instance_ids), config.batch_size, config.seed, step, micro, rank)
        batch = latent_batch(instance, instance_ids, i, scaling)
        if prior is not None:
            j = batch_indices(len(prior_ids), config.batch_size, config.seed + 1, step, micro, rank)
            batch.update({f"prior_{k}": v for k, v in latent_batch(prior, prior_ids, j, scaling).items()})
        return batch

    def parts_of(trained: nn.Module) -> tuple[DiffusionObjective, LoRANetwork | None]:
        inner = trained.objective if isinstance(trained, PriorPreservationObjective) else trained
        return (inner.objective, inner.network) if isinstance(inner, LoRAObjective) else (inner, None)

    def preview(trained: nn.Module, path: Path) -> None:
        from ..images import image_grid

        model, lora = parts_of(trained)
        tuned = replace(pipe, unet=model.unet, text_encoder=model.text_encoder, loras=[])
        prompts = list(settings.preview_prompts) or sorted(set(instance_captions(
            instance["captions"], settings.instance_prompt, data)))[:4]
        with lora_applied(lora) if lora is not None else nullcontext():
            images = [tuned(p, steps=20, seed=i)[0] for i, p in enumerate(prompts)]
        image_grid(images, columns=len(images)).save(path)

    def finish(trained: nn.Module, output: Path) -> None:
        from ..lora_files import save_lora

        model, lora = parts_of(trained)
        if lora is not None:
            save_lora(lora, result, base_model_version=base_model_version(pipe),
                      metadata=lora_metadata(pipe, config, settings, len(instance_ids), data))
        else:
            save_model_folder(pipe, model.unet, model.text_encoder, result, base_path, output.name)
        record = {**config_dict(config), **{k: list(v) if isinstance(v, tuple) else v
                                            for k, v in vars(settings).items()}, "data": str(data)}
        (output / "finetune_config.json").write_text(json.dumps(record, indent=2) + "\n")

    result = output / (f"{output.name}.safetensors" if settings.kind == "lora" else "model")
    train(objective, batches, config, preview=preview, finish=finish)
    return result


def finetune(kind: str = "lora", *, data: str | Path | None, output: str | Path, base: Base = None,
             steps: int = FINETUNE_RECIPE["steps"], batch_size: int = FINETUNE_RECIPE["batch_size"],
             lr: float | None = None, seed: int = 0, resume: bool = True, **options) -> Path:
    """Python entry point: FinetuneSettings fields (rank, alpha, conv_rank, train_text_encoder, instance_prompt,
    class_prompts, num_class_images, prior_weight, ...) and TrainConfig fields (warmup, ema_decay,
    checkpoint_every, preview_every, threads, ...; defaults: FINETUNE_RECIPE) as keywords; returns the LoRA
    file or the model folder."""
    names = set(FinetuneSettings.__dataclass_fields__)
    if isinstance(options.get("class_prompts"), str):
        options["class_prompts"] = (options["class_prompts"],)
    settings = FinetuneSettings(kind=kind, **{k: tuple(v) if k.endswith("prompts") else v
                                              for k, v in options.items() if k in names})
    recipe = {k: v for k, v in FINETUNE_RECIPE.items() if k not in ("steps", "batch_size", "lr")}
    config = TrainConfig(output=Path(output), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         **{**recipe, **{k: v for k, v in options.items() if k not in names}})
    return run_finetune(base, data, config, settings, resume)


def main(argv: list[str] | None = None) -> Path:
    """`nanodiff finetune lora|dreambooth --data FOLDER [flags]`."""
    parser = argparse.ArgumentParser(prog="nanodiff finetune",
                                     description="LoRA or DreamBooth fine-tuning on a folder of captioned images")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--base", "--model", dest="base", default=None,
                        help="model to fine-tune: diffusers folder or single file (default: the built-in model)")
    add_common_arguments(parser, "runs/finetune", FINETUNE_RECIPE)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale alpha / r; default: r)")
    parser.add_argument("--conv-rank", type=int, default=None, help="LoCon: also adapt the res-block convolutions")
    parser.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")
    parser.add_argument("--instance-prompt", default=None, help="one prompt for every image (default: captions)")
    parser.add_argument("--class-prompt", action="append", default=[],
                        help="prior preservation: prompt of the class images (repeatable)")
    parser.add_argument("--num-class-images", type=int, default=0, help="class images generated by the base model")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="lambda of the prior-preservation loss")
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting")
    parser.add_argument("--preview-prompt", action="append", default=[], help="prompt of the previews (repeatable)")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue a run in --output")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data FOLDER is required: a folder of images with captions (.txt or metadata.jsonl)")
    settings = FinetuneSettings(
        kind=args.kind, rank=args.rank, alpha=args.alpha, conv_rank=args.conv_rank,
        train_text_encoder=args.train_text_encoder, instance_prompt=args.instance_prompt,
        class_prompts=tuple(args.class_prompt), num_class_images=args.num_class_images,
        prior_weight=args.prior_weight, snr_gamma=args.snr_gamma, preview_prompts=tuple(args.preview_prompt))
    result = run_finetune(args.base, args.data, config_from_args(args), settings, resume=not args.no_resume)
    print(result)
    return result


if __name__ == "__main__":
    main()
