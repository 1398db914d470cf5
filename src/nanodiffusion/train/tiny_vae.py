"""Distil a tiny autoencoder (models/tiny_vae.py) from a model's VAE on the user's images (TAESD's recipe, simplified).

The teacher encodes each image to its scaled posterior mean z and decodes z back to pixels x_hat. The student
learns both maps: its encoder to reproduce z, its decoder to reproduce x_hat from z (and from z with a little
noise added, since the diffusion model's outputs are near, not on, the encoder's latents):
    loss = |E_s(x) - z|^2 + |D_s(z + n) - D_t(z + n)|_1,   n ~ N(0, noise^2).

    nanodiff train tiny-vae --model path/to/model --data my-images/ --output runs/tiny-vae
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..images import image_grid, to_pil
from ..models.tiny_vae import TinyAutoencoder, TinyVAEConfig, vae_fingerprint
from .args import add_common_arguments, config_from_args
from .data import batch_indices, collate, open_dataset
from .loop import TrainConfig, config_dict, train

RECIPE = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup": 50, "mixed_precision": "no",
          "checkpoint_every": 250, "preview_every": 250}


class TinyVAEObjective(nn.Module):
    """Student encoder and decoder regressed on the frozen teacher VAE's latents and decodings."""

    def __init__(self, student: TinyAutoencoder, teacher: nn.Module, latent_noise: float = 0.1):
        super().__init__()
        self.student, self.teacher, self.latent_noise = student, teacher.requires_grad_(False), latent_noise

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Latent MSE + pixel L1 (module docstring)."""
        scale = self.teacher.config.scaling_factor
        with torch.no_grad():
            z = self.teacher.encode(batch["image"]).mode() * scale
            z_noisy = z + self.latent_noise * torch.randn_like(z)
            target = self.teacher.decode(z_noisy / scale).clamp(-1, 1)
        encoder = (self.student.encode(batch["image"]) - z).pow(2).mean()
        decoder = (self.student.decoder(z_noisy) - target).abs().mean()
        return encoder + decoder, {"encoder_mse": encoder.detach(), "decoder_l1": decoder.detach()}


def load_teacher(model: str | None, vae: str | None) -> tuple[nn.Module, int]:
    """The VAE to distil and the image size: a model's (None: the built-in model's) or a lone VAE folder's."""
    if vae is None:
        from ..pipeline import Pipeline

        pipe = Pipeline.load(model)
        return pipe.vae.float(), pipe.default_size
    from ..checkpoints import load_into, load_state_dict, part_weights, read_json
    from ..models.vae import AutoencoderKL, VAEConfig

    folder = Path(vae)
    teacher = AutoencoderKL(VAEConfig.from_dict(read_json(folder / "config.json")))
    load_into(teacher, load_state_dict(part_weights(folder)), "vae")
    return teacher.eval(), teacher.config.sample_size


def train_tiny_vae(config: TrainConfig, model: str | None = None, data: str | None = None,
                   channels: int = 32, blocks: int = 1, dataset_size: int = 20_000,
                   vae: str | None = None) -> TinyAutoencoder:
    """Distil a tiny autoencoder from the VAE of `model` (None: the built-in model) or of a lone VAE folder;
    writes output/tiny-vae."""
    teacher, size = load_teacher(model, vae)
    dataset = open_dataset(data, size=size, length=dataset_size, seed=config.seed)
    torch.manual_seed(config.seed)
    student = TinyAutoencoder(TinyVAEConfig(latent_channels=teacher.config.latent_channels,
                                            levels=len(teacher.config.block_out_channels) - 1, channels=channels,
                                            blocks=blocks, teacher=vae_fingerprint(teacher)))
    fixed, _ = collate(dataset, torch.arange(min(8, len(dataset))))

    def batches(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        images, _ = collate(dataset, batch_indices(len(dataset), config.batch_size, config.seed, step, micro, rank))
        return {"image": images}

    @torch.no_grad()
    def preview(objective: nn.Module, path: Path) -> None:
        """Originals, the teacher's reconstructions, the student's (three rows)."""
        teacher_out = objective.teacher.decode(objective.teacher.encode(fixed).mode()).clamp(-1, 1)
        student_out = objective.student.decode(objective.student.encode(fixed))
        image_grid(to_pil(torch.cat([fixed, teacher_out, student_out])), columns=len(fixed)).save(path)

    def finish(objective: nn.Module, output: Path) -> None:
        objective.student.save(output / "tiny-vae")
        (output / "train_config.json").write_text(json.dumps(config_dict(config), indent=2))

    return train(TinyVAEObjective(student, teacher), batches, config, preview=preview, finish=finish).student


def main(argv: list[str] | None = None) -> None:
    """`nanodiff train tiny-vae ...`."""
    parser = argparse.ArgumentParser(prog="nanodiff train tiny-vae",
                                     description="distil a tiny autoencoder from a model's VAE (for nanodiff stream)")
    add_common_arguments(parser, "runs/tiny-vae", RECIPE)
    parser.add_argument("--model", default=None, help="the model whose VAE is distilled (default: built-in)")
    parser.add_argument("--vae", default=None, help="distil this VAE folder (config.json + weights) instead")
    parser.add_argument("--channels", type=int, default=32, help="width of the tiny autoencoder")
    parser.add_argument("--blocks", type=int, default=1, help="residual blocks per level")
    parser.add_argument("--ship", default=None, metavar="FOLDER", help="also copy the result here when done")
    args = parser.parse_args(argv)
    train_tiny_vae(config_from_args(args), model=args.model, data=args.data, channels=args.channels,
                   blocks=args.blocks, dataset_size=args.dataset_size, vae=args.vae)
    if args.ship:
        shutil.copytree(Path(args.output) / "tiny-vae", args.ship, dirs_exist_ok=True)
