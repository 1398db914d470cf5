"""The lessons' shared toy setups: a 2-D denoiser trained by score matching, small shapes images, a tiny image
UNet, and the plotting helpers they all use."""

from __future__ import annotations

import random

import torch
from PIL import Image

from ..data.shapes import render, sample_scene
from ..data.toy2d import sample_toy
from ..denoisers import Denoiser
from ..images import to_tensor
from ..models.mlp import NoiseConditionalMLP
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..schedules import NoiseSchedule
from ..train.fit import fit
from ..train.score import dsm_loss, log_uniform_sigmas, schedule_sigmas
from .report import pyplot

TOY_SCHEDULE = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)   # DDPM's: sigma from 0.01 to 157
BATCH = 256


def train_toy(data: str, steps: int = 4000, noise: str = "ddpm", seed: int = 0, hidden: int = 128,
              desc: str = "training") -> tuple[NoiseConditionalMLP, Denoiser, list[float]]:
    """An eps-predicting MLP trained by denoising score matching on a 2-D toy; noise levels from the DDPM schedule
    ("ddpm") or log-uniform in [0.01, 10] (NCSN, "ncsn"). Returns network, its denoiser, the loss curve."""
    torch.manual_seed(seed)
    net = NoiseConditionalMLP(hidden=hidden)
    denoiser = Denoiser(net, TOY_SCHEDULE, "epsilon")
    g = torch.Generator().manual_seed(seed + 1)

    def loss(step: int) -> torch.Tensor:
        sigma = (schedule_sigmas(TOY_SCHEDULE, BATCH, g) if noise == "ddpm"
                 else log_uniform_sigmas(BATCH, 0.01, 10.0, g))
        return dsm_loss(denoiser, sample_toy(data, BATCH, g), sigma, g)

    return net, denoiser, fit(net, loss, steps, lr=3e-3, desc=desc)


def shapes_images(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n single-object shapes scenes (n, 3, size, size) in [-1, 1] and each object's colour."""
    rng = random.Random(f"learn:{seed}")
    scenes = [sample_scene(rng, "all", "single") for _ in range(n)]
    images = torch.cat([to_tensor(render(scene, size)) for scene in scenes])
    return images, [scene.objects[0].color for scene in scenes]


def image_unet(size: int = 16, channels: int = 3) -> UNet2DConditionModel:
    """A tiny unconditional UNet (no attention) for small images."""
    return UNet2DConditionModel(UNetConfig(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=[32, 64],
        layers_per_block=1, down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
        mid_block_type="UNetMidBlock2D", norm_num_groups=8, cross_attention_dim=32))


def unconditional(unet: UNet2DConditionModel):
    """net(x, t) for a UNet without cross-attention."""
    return lambda x, t: unet(x, t, None)


def scatter(ax, points: torch.Tensor, title: str, color: str = "C0", size: float = 2.0) -> None:
    """A 2-D point cloud on fixed axes."""
    ax.scatter(points[:, 0], points[:, 1], s=size, color=color, alpha=0.6, linewidths=0)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), title=title, aspect="equal", xticks=[], yticks=[])


def figure_image(fig) -> Image.Image:
    """Render a matplotlib figure to a PIL image (a GIF frame) and close it."""
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    pyplot().close(fig)
    return image
