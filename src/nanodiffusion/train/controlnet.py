"""Train a ControlNet (Zhang, Rao & Agrawala 2023) for a model: the scene's layout mask steers where shapes go.

The base model (UNet, VAE, text encoder) stays frozen. The ControlNet starts as a copy of the base UNet's
encoder and mid block, its outputs behind zero convolutions (§3.1), so training starts from the base model
exactly. The loss is stage 2's diffusion loss (diffusion.DiffusionObjective, epsilon or v target, min-SNR
weighting) of the UNet steered by the ControlNet, given each training scene's layout mask
(data/conditions.py): white silhouettes on black, no colour, so the prompt still decides the colours.
As in the paper (§3.2) half of the captions are replaced by the empty prompt, which forces the ControlNet
to read the layout from the mask rather than from the words. Runs on the shared loop (loop.py: EMA,
checkpoints, resume, previews); the result is a diffusers ControlNet folder, output/controlnet:

    nanodiff train controlnet --output runs/controlnet --steps 2000
    nanodiff generate "a red circle left of a blue square" --controlnet runs/controlnet/controlnet \
        --control-image layout.png
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import NanoDiffusionError
from ..models.controlnet import ControlNetModel, controlnet_unet
from .args import add_common_arguments, config_from_args
from .cache import fingerprint, load_cache, save_cache
from .data import batch_indices
from .diffusion import DiffusionObjective, cache_latents
from .finetune import Base, latent_batch, load_base
from .loop import TrainConfig, config_dict, train

HINT_CHANNELS = (16, 32, 96, 256)  # conditioning embedding widths (SD's); one stride-2 conv between each pair
CONTROLNET_RECIPE = {"steps": 2000, "batch_size": 32, "lr": 1e-4, "warmup": 50, "mixed_precision": "no",
                     "checkpoint_every": 250, "preview_every": 250}


def hint_channels(vae_scale: int) -> list[int]:
    """Conditioning embedding widths taking the control image down by the VAE's factor (log2 of it stride-2 convs)."""
    return list(HINT_CHANNELS[: int(math.log2(vae_scale)) + 1])


class ControlledUNet(nn.Module):
    """The frozen UNet plus the trainable ControlNet, called as a UNet: net(x, t, context); the batch's control
    images are set in `control` before each call (by ControlNetObjective)."""

    def __init__(self, unet: nn.Module, controlnet: ControlNetModel):
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.controlnet = controlnet.requires_grad_(True)
        self.control: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return controlnet_unet(self.unet, self.controlnet, self.control)(x, t, context)


class ControlNetObjective(nn.Module):
    """The diffusion loss (DiffusionObjective) of the ControlNet-steered UNet; batch["control"] in [0, 1]."""

    def __init__(self, diffusion: DiffusionObjective):
        super().__init__()
        if not isinstance(diffusion.unet, ControlledUNet):
            raise TypeError("ControlNetObjective needs a DiffusionObjective over a ControlledUNet")
        self.diffusion = diffusion.requires_grad_(False)
        diffusion.unet.controlnet.requires_grad_(True)

    @property
    def controlnet(self) -> ControlNetModel:
        return self.diffusion.unet.controlnet

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.diffusion.unet.control = batch["control"]
        try:
            return self.diffusion(batch)
        finally:
            self.diffusion.unet.control = None


def cache_layouts(dataset, path: Path) -> torch.Tensor:
    """Every scene's layout mask as uint8 [N, H, W] (one channel: the mask is gray), cached at `path` under a
    fingerprint of the dataset (cache.py)."""
    key = fingerprint(dataset)
    cache = load_cache(path, key)
    if cache is None:
        cache = {"layouts": torch.stack([dataset[i]["layout"] for i in range(len(dataset))])}
        save_cache(path, cache, key)
    return cache["layouts"]


def layout_controls(layouts: torch.Tensor) -> torch.Tensor:
    """uint8 masks [B, H, W] -> control images [B, 3, H, W] in [0, 1] (what prepare_control_image gives)."""
    return (layouts.float() / 255)[:, None].expand(-1, 3, -1, -1).contiguous()


def preview_cases(n: int = 4) -> list[tuple]:
    """n held-out position prompts (structured, caption) with a layout mask each, for the preview grids."""
    from ..data.conditions import prompt_layout
    from ..data.shapes import heldout_prompts

    cases = [case for case in heldout_prompts(4 * n, 0) if case[0].kind == "position"][:n]
    return [(prompt, text, prompt_layout(prompt, i)) for i, (prompt, text) in enumerate(cases)]


def train_controlnet(config: TrainConfig, base: Base = None, dataset_size: int = 20_000, snr_gamma: float = 5.0,
                     uncond_prob: float = 0.5, preview_steps: int = 20) -> Path:
    """Train a ControlNet on layout masks of the shapes scenes for `base` (None: the built-in model);
    returns the ControlNet folder output/controlnet."""
    from ..data.conditions import LayoutDataset

    pipe, base_path = load_base(base)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    dataset = LayoutDataset(dataset_size, config.seed, split="train", size=pipe.default_size)
    cache = cache_latents(pipe.vae, dataset, output / "latents.pt")
    layouts = cache_layouts(dataset, output / "layouts.pt")
    ids = pipe.tokenizer(cache["captions"])
    scaling = float(pipe.vae.config.scaling_factor)

    torch.manual_seed(config.seed)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=hint_channels(pipe.vae_scale))
    diffusion = DiffusionObjective(ControlledUNet(pipe.unet, controlnet), pipe.text_encoder,
                                   pipe.schedule.alphas_cumprod, pipe.tokenizer([""])[0], pipe.prediction,
                                   snr_gamma, uncond_prob, pipe.layout, sampled_map=True)
    objective = ControlNetObjective(diffusion)
    cases = preview_cases()

    def batches(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        i = batch_indices(len(ids), config.batch_size, config.seed, step, micro, rank)
        return {**latent_batch(cache, ids, i, scaling), "control": layout_controls(layouts[i])}

    def preview(trained: nn.Module, path: Path) -> None:
        from ..images import image_grid

        steered = replace(pipe, controlnet=trained.controlnet, loras=[])
        images = []
        for i, (_, text, mask) in enumerate(cases):
            images += [mask, steered(text, steps=preview_steps, seed=i, sampler="euler", control_image=mask)[0]]
        image_grid(images, columns=4).save(path)
        path.with_suffix(".txt").write_text("\n".join(text for _, text, _ in cases) + "\n")

    def finish(trained: nn.Module, output: Path) -> None:
        from ..controlnet_files import save_controlnet

        save_controlnet(trained.controlnet, output / "controlnet")
        record = {**config_dict(config), "base": str(base_path or pipe.name), "dataset_size": dataset_size,
                  "snr_gamma": snr_gamma, "uncond_prob": uncond_prob, "condition": "layout mask"}
        (output / "controlnet_config.json").write_text(json.dumps(record, indent=2) + "\n")

    train(objective, batches, config, preview=preview, finish=finish)
    return output / "controlnet"


def main(argv: list[str] | None = None) -> Path:
    """`nanodiff train controlnet [flags]` / `python -m nanodiffusion.train.controlnet ...`."""
    parser = argparse.ArgumentParser(prog="nanodiff train controlnet",
                                     description="train a layout-mask ControlNet for a model on the shapes scenes")
    parser.add_argument("--base", "--model", dest="base", default=None,
                        help="model the ControlNet steers: a diffusers folder or single file (default: built-in)")
    add_common_arguments(parser, "runs/controlnet", CONTROLNET_RECIPE)
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting")
    parser.add_argument("--uncond-prob", type=float, default=0.5,
                        help="caption dropout (the paper's 0.5: the layout must come from the mask)")
    args = parser.parse_args(argv)
    if args.data is not None:
        raise NanoDiffusionError("ControlNet training draws its layout masks from the synthetic shapes scenes: "
                                 "--data is not supported here (leave it out)")
    result = train_controlnet(config_from_args(args), args.base, dataset_size=args.dataset_size,
                              snr_gamma=args.snr_gamma, uncond_prob=args.uncond_prob)
    print(result)
    return result


if __name__ == "__main__":
    main()
