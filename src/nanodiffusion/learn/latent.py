"""Lesson `latent`: latent diffusion (Rombach et al. 2022): what the VAE keeps, the latent channels, and what a
denoising step costs on latents against pixels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..images import image_grid
from ..models.unet import UNet2DConditionModel
from .builtin import load
from .report import Page, pictures, pyplot
from .toys import shapes_images


def multiply_adds(unet: torch.nn.Module, shape: tuple, context: torch.Tensor) -> float:
    """Multiply-adds of the convolutions and linear layers in one UNet forward pass on a batch of `shape`,
    counted with forward hooks (a cost that does not depend on how busy the machine is)."""
    total = 0.0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in unet.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        unet(torch.randn(shape), 500.0, context)
    for handle in handles:
        handle.remove()
    return total


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    pipe = load()
    vae = pipe.vae
    page.text("Latent diffusion runs the diffusion model on the latents of an autoencoder instead of on pixels. "
              "The encoder E compresses an image to a small latent z, the decoder D maps it back; the diffusion "
              "model only ever sees z (scaled to unit variance):")
    page.equation(r"z = s\cdot E(x),\qquad \hat x = D(z / s),\qquad \epsilon_\theta(z_t, t, c)\ \text{on } z")
    page.code("models/vae.py:AutoencoderKL", "pipeline.py:Pipeline.encode_image", "pipeline.py:Pipeline.decode")
    images = shapes_images(8, pipe.default_size, seed=11)[0]
    with torch.no_grad():
        latents = vae.encode(images).mean * vae.config.scaling_factor
        decoded = pipe.decode(latents)
    mse = (decoded - images).pow(2).flatten(1).mean(1)
    psnr = (10 * torch.log10(4 / mse)).tolist()
    difference = ((decoded - images).abs() * 4 - 1).clamp(-1, 1)
    page.image(image_grid(pictures(torch.cat([images, decoded, difference]), 2), columns=8), "reconstruction",
               "Top: images. Middle: VAE encode + decode. Bottom: |difference| x 4 (black = none, bright = large)")
    channels = latents[:4]
    fig, axes = plt.subplots(4, channels.shape[1], figsize=(2 * channels.shape[1], 8))
    for row in range(4):
        for c in range(channels.shape[1]):
            axes[row, c].imshow(channels[row, c], cmap="RdBu_r", vmin=-3, vmax=3)
            axes[row, c].set(xticks=[], yticks=[], title=f"channel {c}" if row == 0 else "")
    page.figure(fig, "channels", "The latent channels of the first four images (blue negative, red positive)")
    side = pipe.default_size // pipe.vae_scale
    context = pipe.encode_text(["a red circle"], [""], 1)[0]["context"]
    pixel_unet = UNet2DConditionModel(replace(pipe.unet.config, in_channels=3, out_channels=3))
    latent_cost = multiply_adds(pipe.unet, (1, pipe.unet.config.in_channels, side, side), context)  # + slot map
    pixel_cost = multiply_adds(pixel_unet, (1, 3, pipe.default_size, pipe.default_size), context)
    page.table(["", "values per image", "UNet multiply-adds per denoising step (millions)"],
               [["pixels", 3 * pipe.default_size**2, pixel_cost / 1e6],
                [f"latents ({latents.shape[1]} x {side} x {side})", latents[0].numel(), latent_cost / 1e6]])
    page.text(f"The VAE keeps the shapes, colours and edges (PSNR {min(psnr):.1f} to {max(psnr):.1f} dB over the "
              f"eight images) in {3 * pipe.default_size**2 / latents[0].numel():.0f}x fewer values, and the same "
              f"UNet costs {pixel_cost / latent_cost:.1f}x less per denoising step on latents than on pixels.")
    return page.write()
