"""Everything on top of the pipeline works with the shipped built-in model (and its layout stage): every sampler,
guidance, img2img, inpainting, LoRA, ControlNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.pipeline import Pipeline
from nanodiffusion.samplers import SAMPLERS

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()


def varied(image: Image.Image) -> bool:
    """Not a flat or broken image: finite pixels with real contrast."""
    pixels = np.asarray(image, dtype=np.float32)
    return pixels.std() > 10


def test_builtin_has_its_layout_stage(pipe):
    assert pipe.layout is not None
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels + pipe.layout.config.map_channels


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_draws_an_image(pipe, sampler):
    image = pipe(PROMPT, steps=6, sampler=sampler, seed=0)[0]
    assert image.size == (64, 64) and varied(image)


@pytest.mark.xfail(strict=True, reason="known limitation (docs/builtin.md): the UNet trusts the layout stage's slot map "
                   "over the noisy init latents, so from strength ~0.2 img2img follows the prompt's sampled layout")
def test_img2img_keeps_the_init_image_at_low_strength(pipe):
    init = pipe(PROMPT, steps=12, seed=1)[0]
    light = pipe("a green star", init_image=init, strength=0.2, steps=20, seed=2)[0]
    heavy = pipe("a green star", init_image=init, strength=1.0, steps=20, seed=2)[0]
    reference = np.asarray(init, dtype=np.float32)
    assert np.abs(np.asarray(light, dtype=np.float32) - reference).mean() < \
        np.abs(np.asarray(heavy, dtype=np.float32) - reference).mean()


def test_inpainting_repaints_the_masked_half_and_keeps_the_other(pipe):
    from nanodiffusion.data.captions import Prompt
    from nanodiffusion.data.shapes import Obj, Scene, render

    objects = (Obj("circle", "blue", 0.15, 0.25, 0.5), Obj("square", "red", 0.15, 0.75, 0.5))
    init = render(Scene(objects, Prompt("two", (("circle", None), ("square", None)))))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))   # repaint the left half (the blue circle) only
    out = pipe("a yellow triangle", init_image=init, mask=mask, strength=1.0, steps=12, seed=4)[0]
    change = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(init, dtype=np.float32)).mean(-1)
    assert change[:, 40:].mean() < 8 and change[:, :24].mean() > 3 * change[:, 40:].mean()


def test_lora_file_changes_the_image_and_weight_zero_does_not(pipe, tmp_path):
    from nanodiffusion.lora_files import save_lora
    from nanodiffusion.models.lora import create_lora

    network = create_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.1)
    path = tmp_path / "random.safetensors"
    save_lora(network, path)
    plain = pipe(PROMPT, steps=8, seed=5)[0]
    pipe.loras = [(path, 0.0)]
    try:
        zero = pipe(PROMPT, steps=8, seed=5)[0]
        pipe.loras = [(path, 1.0)]
        changed = pipe(PROMPT, steps=8, seed=5)[0]
    finally:
        pipe.loras = []
    assert zero.tobytes() == plain.tobytes()
    assert changed.tobytes() != plain.tobytes()


def test_controlnet_built_from_the_builtin_unet_starts_as_the_identity(pipe):
    from nanodiffusion.models.controlnet import ControlNetModel

    plain = pipe(PROMPT, steps=8, seed=6)[0]
    pipe.controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=[16, 32, 96]).eval()
    try:
        steered = pipe(PROMPT, steps=8, seed=6, control_image=Image.new("RGB", (64, 64)))[0]
    finally:
        pipe.controlnet = None
    assert np.abs(np.asarray(steered, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max() <= 1
