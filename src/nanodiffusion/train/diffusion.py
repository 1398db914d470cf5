"""Stage 2 of latent diffusion: train the text-conditioned UNet (and, for the built-in model, the text encoder).

The DDPM objective (Ho et al. 2020, eq. 14) on VAE latents: draw t, noise x0 to
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and regress the network's prediction onto its target
(eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, Salimans & Ho 2022), weighted per sample by
min-SNR-gamma (Hang et al. 2023). The caption is replaced by the empty prompt with probability
`uncond_prob`, so the same network is the unconditional model of classifier-free guidance
(Ho & Salimans 2022); with a layout stage, a further `map_only_prob` of the captioned images keep their slot map
but not their text, so the network is also the map-only model of LayoutGuidance (guidance.py). The VAE is
frozen: its latents are computed once and cached in the run folder.

    python -m nanodiffusion.train.diffusion --vae runs/vae/vae --output runs/diffusion --steps 3200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import NanoDiffusionError
from .args import add_common_arguments, config_from_args
from .builtin import (
    BUILTIN_CFG,
    BUILTIN_LAYOUT,
    BUILTIN_SCHEDULER,
    BUILTIN_TEXT_ENCODER,
    BUILTIN_UNET,
    DIFFUSION_RECIPE,
    MAP_ONLY_PROB,
    MAX_TOKENS,
    write_pipeline_folder,
)
from .data import batch_indices, open_dataset
from .loop import TrainConfig, config_dict, train


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023, eq. 10): min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v)."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the network regresses: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise NanoDiffusionError(f"unknown prediction type {prediction!r}: use epsilon or v_prediction")


class DiffusionObjective(nn.Module):
    """Text encoder + UNet with the diffusion loss as forward, so DDP wraps both at once."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, alphas_cumprod: torch.Tensor,
                 empty_ids: torch.Tensor, prediction: str = "epsilon", snr_gamma: float = 5.0,
                 uncond_prob: float = 0.1, layout: nn.Module | None = None, sampled_map: bool = False,
                 map_only_prob: float = 0.0):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.layout = layout
        self.sampled_map = sampled_map   # fine-tuning without boxes: the map generation would paint, not zeros
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("empty_ids", empty_ids.long(), persistent=False)
        self.prediction = prediction
        self.snr_gamma = snr_gamma
        self.uncond_prob = uncond_prob
        self.map_only_prob = map_only_prob  # captioned rows whose UNet reads the map but the empty prompt's states

    @torch.no_grad()
    def frozen_slot_map(self, context: torch.Tensor, batch: dict[str, torch.Tensor], keep: torch.Tensor,
                        height: int, width: int) -> torch.Tensor:
        """Fine-tuning's map: the frozen layout stage's slots painted at each image's true boxes (batch "boxes" where
        "has_boxes"); zeros for images without (sampled boxes would contradict the image: docs/finetune.md), or with
        `sampled_map` the map generation paints from boxes sampled from the caption (a layout ControlNet must learn
        to move objects away from that map to its control image)."""
        if self.sampled_map:
            noise = torch.randn(len(context), self.layout.config.slots, 4, device=context.device)
            return self.layout(context, noise, height, width) * keep.view(-1, 1, 1, 1)
        known = keep & batch["has_boxes"] if "has_boxes" in batch else torch.zeros_like(keep)
        if not known.any():
            return context.new_zeros(len(context), self.layout.config.map_channels, height, width)
        slot_map = self.layout.paint(batch["boxes"], self.layout.read_slots(context), height, width)
        return slot_map * known.view(-1, 1, 1, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Min-SNR weighted MSE between prediction and target at uniformly drawn timesteps; with a layout model,
        the UNet also sees the slot map of the true boxes, and (with labels: stage 2) the layout losses are added."""
        mean, std, ids = batch["mean"], batch["std"], batch["input_ids"]
        scale = batch["scaling_factor"].view(-1, 1, 1, 1)
        x0 = (mean + std * torch.randn_like(mean)) * scale  # a posterior sample, scaled to unit variance
        drop = torch.rand(len(ids), device=ids.device) < self.uncond_prob
        ids = torch.where(drop[:, None], self.empty_ids.expand_as(ids), ids)
        t = torch.randint(0, len(self.alphas_cumprod), (len(x0),), device=x0.device)
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(x0)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        context = self.text_encoder(ids)
        unet_context = context
        if self.layout is not None and self.map_only_prob > 0:
            map_only = ~drop & (torch.rand(len(ids), device=ids.device) < self.map_only_prob)
            empty = self.text_encoder(self.empty_ids[None]).expand_as(context)
            unet_context = torch.where(map_only[:, None, None], empty, context)
        logs, layout_loss = {}, 0.0
        if self.layout is not None and "labels" in batch:   # training the layout stage on known boxes
            slots, boxes, keep = self.layout.read_slots(context), batch["boxes"], ~drop
            slot_map = self.layout.paint(boxes, slots, *x_t.shape[-2:]) * keep.view(-1, 1, 1, 1)
            per_image = (self.layout.flow_loss(boxes, slots, context)
                         + self.layout.slot_loss(slots, batch["labels"])) * keep   # captioned images only
            layout_loss = per_image.sum() / keep.sum().clamp(min=1)
            logs["layout"] = layout_loss.detach()
            x_t = torch.cat([x_t, slot_map], dim=1)
        elif self.layout is not None:   # fine-tuning a model with a frozen layout stage
            x_t = torch.cat([x_t, self.frozen_slot_map(context, batch, ~drop, *x_t.shape[-2:])], dim=1)
        prediction = self.unet(x_t, t, unet_context).float()
        target = diffusion_target(x0, noise, alpha_bar, self.prediction)
        mse = (prediction - target).pow(2).flatten(1).mean(1)
        weight = min_snr_weight(alpha_bar.flatten() / (1 - alpha_bar.flatten()), self.snr_gamma, self.prediction)
        return (weight * mse).mean() + layout_loss, {"mse": mse.mean().detach(), **logs}


@torch.no_grad()
def cache_latents(vae: nn.Module, dataset, path: Path, batch_size: int = 64, bf16: bool = False) -> dict:
    """Encode every image once to its posterior mean and std (and keep the captions); cached at `path` under a
    fingerprint of the data, the VAE and the precision (cache.py), so a changed folder is encoded again."""
    from .cache import fingerprint, load_cache, save_cache

    key = fingerprint(dataset, vae, bf16=bf16)
    cache = load_cache(path, key)
    if cache is not None:
        return cache
    means, stds, captions = [], [], []
    started = time.time()
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            posterior = vae.encode(torch.stack([item["image"] for item in items]))
        means.append(posterior.mean.float().half())
        stds.append((0.5 * posterior.logvar.float()).exp().half())
        captions += [item["caption"] for item in items]
    cache = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    save_cache(path, cache, key)
    print(f"cached {len(captions)} latents in {time.time() - started:.0f} s")
    return cache


def load_vae(folder: Path) -> nn.Module:
    """The frozen autoencoder of stage 1 (a diffusers-style vae/ folder)."""
    from safetensors.torch import load_file

    from ..models.vae import AutoencoderKL, VAEConfig

    folder = Path(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file() or not (folder / "config.json").is_file():
        raise NanoDiffusionError(f"no trained VAE in {folder}: train one first with `nanodiff train vae` "
                                 "and pass --vae RUN/vae")
    vae = AutoencoderKL(VAEConfig.from_dict(json.loads((folder / "config.json").read_text())))
    vae.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    return vae.eval().requires_grad_(False)


def build_tokenizer(captions: list[str]):
    """The word tokenizer over the shapes vocabulary plus every word of the training captions."""
    from ..data.shapes import VOCABULARY
    from ..models.word_tokenizer import WordTokenizer

    return WordTokenizer.build([*VOCABULARY, *captions], model_max_length=MAX_TOKENS)


def preview_prompts(captions: list[str], n: int = 8) -> list[str]:
    """Half training captions, half held-out compositions (never seen in training)."""
    from ..data.shapes import heldout_prompts

    return captions[: n // 2] + [text for _, text in heldout_prompts(n - n // 2, 0)]


def train_diffusion(config: TrainConfig, vae_folder: Path, data: str | None = None, dataset_size: int = 20_000,
                    prediction: str = "epsilon", snr_gamma: float = 5.0, uncond_prob: float = 0.1,
                    unet_config: dict | None = None, text_config: dict | None = None,
                    layout_config: dict | None = None, preview_steps: int = 20,
                    map_only_prob: float = MAP_ONLY_PROB) -> nn.Module:
    """Train UNet + text encoder (+ the layout model, on the shapes scenes, whose object boxes are known) on
    cached latents; writes output/model (a diffusers-style folder)."""
    from ..models.clip import CLIPTextConfig, CLIPTextModel
    from ..models.layout import LayoutConfig, LayoutModel
    from ..models.unet import UNet2DConditionModel, UNetConfig
    from ..schedules import NoiseSchedule

    vae = load_vae(vae_folder)
    dataset = open_dataset(data, length=dataset_size, seed=config.seed)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    cache = cache_latents(vae, dataset, output / "latents.pt", bf16=config.mixed_precision == "bf16")
    tokenizer = build_tokenizer(cache["captions"])
    all_ids = tokenizer(cache["captions"])
    scaling = torch.tensor(float(vae.config.scaling_factor))

    torch.manual_seed(config.seed)
    unet_config = dict(unet_config or BUILTIN_UNET)
    text_config = {**BUILTIN_TEXT_ENCODER, **(text_config or {}), "vocab_size": len(tokenizer)}
    layout, boxes, labels = None, None, None
    if hasattr(dataset, "boxes"):   # the shapes scenes: learn the layout stage too
        layout = LayoutModel(LayoutConfig.from_dict({**BUILTIN_LAYOUT, **(layout_config or {}),
                                                     "context_dim": text_config["hidden_size"]}))
        boxes = torch.tensor([dataset.boxes(i) for i in range(len(dataset))])
        labels = torch.tensor([dataset.labels(i) for i in range(len(dataset))])
    # the UNet denoises the VAE's latents, and also reads the slot map when there is a layout stage
    unet_config["out_channels"] = vae.config.latent_channels
    unet_config["in_channels"] = vae.config.latent_channels + (layout.config.map_channels if layout else 0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(unet_config))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
    schedule = NoiseSchedule.from_config(BUILTIN_SCHEDULER)
    objective = DiffusionObjective(unet, text_encoder, schedule.alphas_cumprod, tokenizer([""])[0],
                                   prediction, snr_gamma, uncond_prob, layout, map_only_prob=map_only_prob)
    prompts = preview_prompts(cache["captions"])

    def batches(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        i = batch_indices(len(all_ids), config.batch_size, config.seed, step, micro, rank)
        batch = {"mean": cache["mean"][i].float(), "std": cache["std"][i].float(), "input_ids": all_ids[i],
                 "scaling_factor": scaling.expand(len(i))}
        return batch if boxes is None else {**batch, "boxes": boxes[i], "labels": labels[i]}

    def preview(objective: nn.Module, path: Path) -> None:
        from ..images import image_grid
        from ..pipeline import Pipeline

        pipe = Pipeline(unet=objective.unet, vae=vae, text_encoder=objective.text_encoder, tokenizer=tokenizer,
                        schedule=schedule, prediction=prediction, name="preview", layout=objective.layout,
                        default_size=vae.config.sample_size, default_cfg=BUILTIN_CFG)
        images = [pipe(p, steps=preview_steps, sampler="euler", seed=i)[0] for i, p in enumerate(prompts)]
        image_grid(images, columns=len(images) // 2).save(path)
        (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")

    def finish(objective: nn.Module, output: Path) -> None:
        write_pipeline_folder(output / "model", objective.unet, vae, objective.text_encoder, tokenizer,
                              {**BUILTIN_SCHEDULER, "prediction_type": prediction}, name=output.name,
                              layout=objective.layout)
        (output / "train_config.json").write_text(json.dumps(config_dict(config), indent=2))

    return train(objective, batches, config, preview=preview, finish=finish)


def main(argv: list[str] | None = None) -> None:
    """`nanodiff train diffusion ...` / `python -m nanodiffusion.train.diffusion ...`."""
    parser = argparse.ArgumentParser(prog="nanodiff train diffusion",
                                     description="train the text-conditioned UNet and text encoder (stage 2)")
    add_common_arguments(parser, "runs/diffusion", DIFFUSION_RECIPE)
    parser.add_argument("--vae", default="runs/vae/vae", help="trained VAE folder (from `nanodiff train vae`)")
    parser.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting")
    parser.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    parser.add_argument("--map-only-prob", type=float, default=MAP_ONLY_PROB,
                        help="with a layout stage: captioned images trained on their slot map without their text")
    args = parser.parse_args(argv)
    train_diffusion(config_from_args(args), Path(args.vae), data=args.data, dataset_size=args.dataset_size,
                    prediction=args.prediction, snr_gamma=args.snr_gamma, uncond_prob=args.uncond_prob,
                    map_only_prob=args.map_only_prob)


if __name__ == "__main__":
    main()
