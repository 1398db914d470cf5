"""A tiny autoencoder distilled from a model's VAE, for real-time decoding (the TAESD idea, Bohan 2023).

Plain convolutions and ReLUs, no normalisation or attention: an encoder of stride-2 convolutions to the
latent grid and a decoder of nearest-neighbour upsampling + convolutions back to pixels. It works in the
diffusion model's *scaled* latent space (z * scaling_factor), so it drops in for Pipeline.encode_image /
Pipeline.decode. `teacher` records a hash of the VAE it was distilled from: a tiny VAE only fits its teacher.
A saved one is a folder: config.json + diffusion_pytorch_model.safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import NanoDiffusionError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class TinyVAEConfig:
    """Latent channels, downsampling factor (2 ** levels), width, residual blocks per level, teacher hash."""

    latent_channels: int = 4
    levels: int = 2
    channels: int = 32
    blocks: int = 1
    teacher: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> TinyVAEConfig:
        """Known keys only."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Block(nn.Module):
    """x + conv(relu(conv(relu(conv(x))))): a residual block of three 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.conv(x))


class TinyAutoencoder(nn.Module):
    """Pixels in [-1, 1] <-> scaled latents, at 2 ** levels pixels per latent cell."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.config = config
        c = config.channels
        encoder: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU()]
        for _ in range(config.levels):
            encoder += [nn.Conv2d(c, c, 3, stride=2, padding=1), *(Block(c) for _ in range(config.blocks))]
        self.encoder = nn.Sequential(*encoder, nn.Conv2d(c, config.latent_channels, 3, padding=1))
        decoder: list[nn.Module] = [nn.Conv2d(config.latent_channels, c, 3, padding=1), nn.ReLU()]
        for _ in range(config.levels):
            decoder += [*(Block(c) for _ in range(config.blocks)), nn.Upsample(scale_factor=2),
                        nn.Conv2d(c, c, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder, Block(c), nn.Conv2d(c, 3, 3, padding=1))

    def encode(self, image: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents."""
        return self.encoder(image)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        return self.decoder(latents).clamp(-1, 1)

    def save(self, folder: str | Path) -> Path:
        """Write config.json + safetensors weights."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        os.chmod(folder / WEIGHTS, 0o644)   # safetensors writes 0600; shipped weights must be readable by all
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TinyAutoencoder:
        """Read a folder written by `save`; a clear error when it is not one."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
            raise NanoDiffusionError(f"{folder} is not a tiny VAE folder (config.json + {WEIGHTS}): "
                                     "make one with `nanodiff train tiny-vae`")
        try:
            model = cls(TinyVAEConfig.from_dict(json.loads((folder / "config.json").read_text())))
            model.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS).items()})
        except (ValueError, RuntimeError, OSError, TypeError) as error:
            raise NanoDiffusionError(f"cannot read the tiny VAE in {folder}: {str(error).splitlines()[0]}") from None
        return model.eval().requires_grad_(False)


def vae_fingerprint(vae: nn.Module) -> str:
    """A short hash of a VAE's weights rounded to float16, to tell which VAE a tiny one was distilled from (the
    same whether the VAE is stored in float32 or, as the built-in model ships, in float16)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().half().numpy().tobytes())
    return digest.hexdigest()[:16]
