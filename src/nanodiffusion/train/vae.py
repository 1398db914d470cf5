"""Stage 1 of latent diffusion: train the autoencoder (Rombach et al. 2022, sec. 3.1).

On the shapes scenes it trains on `CodecDataset`: half the scenes keep the palette, half have their objects
recoloured in any hue but a held-out pair's, so the codec does not learn which colour goes with which shape.

Loss per image: L1 reconstruction + beta * KL(q(z|x) || N(0, I)), both summed over the image and
divided by its pixel count. Without a discriminator or LPIPS (neither exists offline at this scale)
the L1 term alone keeps the flat-coloured shapes sharp. After training, the latent scaling factor is
set to 1 / std(z) over the data, as Stable Diffusion did (0.18215), so the diffusion model sees
unit-variance latents.

    python -m nanodiffusion.train.vae --output runs/vae --steps 600
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ..images import image_grid, to_pil
from .args import add_common_arguments, config_from_args
from .builtin import BUILTIN_VAE, VAE_RECIPE
from .data import batch_indices, collate, open_dataset
from .loop import TrainConfig, config_dict, train
from .save import save_module


class VAEObjective(nn.Module):
    """The autoencoder's training loss as a module, so DDP can wrap it."""

    def __init__(self, vae: nn.Module, kl_weight: float = 1e-4):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L1 + beta * KL) / pixels, averaged over the batch."""
        x = batch["image"]
        posterior = self.vae.encode(x)
        reconstruction = self.vae.decode(posterior.sample())
        pixels = x[0].numel()
        l1 = (reconstruction.float() - x).abs().flatten(1).sum(1) / pixels
        kl = posterior.kl().float() / pixels
        loss = (l1 + self.kl_weight * kl).mean()
        return loss, {"l1": l1.mean().detach(), "kl": kl.mean().detach()}


@torch.no_grad()
def latent_std(vae: nn.Module, images: torch.Tensor) -> float:
    """Standard deviation of posterior samples over a set of images (its inverse is the scaling factor)."""
    return float(torch.cat([vae.encode(x).sample() for x in images.split(32)]).std())


@torch.no_grad()
def reconstruction_grid(vae: nn.Module, images: torch.Tensor, path: Path) -> None:
    """Originals (top row) above their reconstructions (bottom row), as one PNG."""
    reconstruction = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
    image_grid(to_pil(torch.cat([images, reconstruction])), columns=len(images)).save(path)


def train_vae(config: TrainConfig, data: str | None = None, vae_config: dict | None = None,
              kl_weight: float = 1e-4, dataset_size: int = 20_000) -> nn.Module:
    """Train an AutoencoderKL on shapes scenes or an image folder; writes output/vae (diffusers folder)."""
    from ..models.vae import AutoencoderKL, VAEConfig

    dataset = open_dataset(data, length=dataset_size, seed=config.seed, codec=True)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(VAEConfig.from_dict(vae_config or BUILTIN_VAE))
    fixed, _ = collate(dataset, torch.arange(min(8, len(dataset))))
    plain = open_dataset(data, length=dataset_size, seed=config.seed)  # the images stage 2 will encode
    calibration, _ = collate(plain, batch_indices(len(plain), 256, config.seed, step=-1))

    def batches(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        images, _ = collate(dataset, batch_indices(len(dataset), config.batch_size, config.seed, step, micro, rank))
        return {"image": images}

    def preview(objective: nn.Module, path: Path) -> None:
        reconstruction_grid(objective.vae, fixed, path)

    def finish(objective: nn.Module, output: Path) -> None:
        vae = objective.vae
        vae.config.scaling_factor = 1.0 / latent_std(vae, calibration)
        save_module(vae, vae.config.to_dict(), output / "vae", "diffusion_pytorch_model.safetensors")
        (output / "train_config.json").write_text(json.dumps(config_dict(config), indent=2))

    objective = train(VAEObjective(vae, kl_weight), batches, config, preview=preview, finish=finish)
    return objective.vae


def main(argv: list[str] | None = None) -> None:
    """`nanodiff train vae ...` / `python -m nanodiffusion.train.vae ...`."""
    parser = argparse.ArgumentParser(prog="nanodiff train vae", description="train the autoencoder (stage 1)")
    add_common_arguments(parser, "runs/vae", VAE_RECIPE)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="beta of the KL term")
    args = parser.parse_args(argv)
    train_vae(config_from_args(args), data=args.data, kl_weight=args.kl_weight, dataset_size=args.dataset_size)


if __name__ == "__main__":
    main()
