"""The generation request: diffusers' names, the result object, batch count, variation seeds, hires fix, tiling."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.inpaint_region import masked_box
from nanodiffusion.noise import centre_paste, seeded_noise, slerp
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.prompts import parse_parameters
from nanodiffusion.request import GenerationRequest, GenerationResult, HiresFix

SIZE = 32


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(SIZE)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def test_diffusers_names_give_the_same_images_as_ours(pipe):
    ours = pipe("a red circle", "blue", steps=3, cfg=4.0, seed=7, batch=2)
    theirs = pipe(prompt="a red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(7), num_images_per_prompt=2, output_type="pil")
    assert isinstance(theirs, GenerationResult) and len(theirs.images) == 2
    assert np.array_equal(pixels(ours), pixels(theirs.images))
    assert theirs.nsfw_content_detected is None


def test_guidance_scale_at_or_below_1_means_no_guidance_as_in_diffusers(pipe):
    """diffusers guides only when guidance_scale > 1 (SD-Turbo's guidance_scale=0.0 is the conditional model alone);
    our cfg keeps the web UI's formula, where cfg 0 is the unconditional model."""
    conditional = pixels(pipe("a red circle", steps=2, seed=5, cfg=1.0))
    assert np.array_equal(pixels(pipe("a red circle", num_inference_steps=2, seed=5, guidance_scale=0.0)), conditional)
    assert not np.array_equal(pixels(pipe("a red circle", steps=2, seed=5, cfg=0.0)), conditional)


def test_a_request_object_runs_like_its_keywords(pipe):
    request = GenerationRequest("a red circle", steps=2, seed=3, cfg=5.0)
    assert np.array_equal(pixels(pipe(request)), pixels(pipe("a red circle", steps=2, seed=3, cfg=5.0)))
    with pytest.raises(NanoDiffusionError, match="not both"):
        pipe(request, steps=4)


@pytest.mark.parametrize("settings, message", [
    ({"num_steps": 3}, "unknown generation setting 'num_steps'"),
    ({"cfg": 3.0, "guidance_scale": 3.0}, "both given"),
    ({"output_type": "latent"}, "output_type 'latent'"),
    ({"generator": 5}, "generator must be a torch.Generator"),
    ({"n_iter": 0}, "n_iter 0"),
    ({"subseed_strength": 1.5}, "subseed_strength"),
    ({"seed": 2**64}, "below 2\\^64"),
    ({"hires": HiresFix(upscaler="esrgan")}, "hires upscaler 'esrgan'"),
    ({"hires": HiresFix(scale=100)}, "width 3200"),
    ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
])
def test_bad_settings_get_one_clear_line(pipe, settings, message):
    with pytest.raises(NanoDiffusionError, match=message):
        pipe("a red circle", **{"steps": 1, **settings})


def test_prompt_lists_give_one_image_per_prompt_with_its_own_text(pipe):
    images = pipe(["a red circle", "a blue square"], ["green", "yellow"], steps=2, seed=4)
    assert len(images) == 2
    texts = [parse_parameters(image.info["parameters"])[:2] for image in images]
    assert texts == [("a red circle", "green"), ("a blue square", "yellow")]
    alone = pipe("a blue square", "yellow", steps=2, seed=5)
    assert np.abs(pixels(images[1:]) - pixels(alone)).max() <= 1   # a batch of two rounds like one image


def test_batch_count_continues_the_seeds(pipe):
    images = pipe("a red circle", steps=2, seed=20, n_iter=2, batch=2)
    assert [parse_parameters(image.info["parameters"])[2]["Seed"] for image in images] == ["20", "21", "22", "23"]
    assert np.array_equal(pixels(images[2:3]), pixels(pipe("a red circle", steps=2, seed=22)))


def test_callback_on_step_end_sees_every_step_and_may_not_swap_latents(pipe):
    seen = []
    pipe("a red circle", num_inference_steps=3, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == [0, 1, 2]
    with pytest.raises(NanoDiffusionError, match="returned new latents"):
        pipe("a red circle", steps=2, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] + 1})


def test_slerp_keeps_the_ends_and_a_gaussian_norm():
    a, b = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.randn(4, 16, 16)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-5) and torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    middle = slerp(0.5, a, b)
    assert abs(middle.norm() / a.norm() - 1) < 0.05      # a straight average would shrink it by ~1/sqrt(2)
    assert abs((a + b).div(2).norm() / a.norm() - 0.71) < 0.05


def test_variation_seed_noise_and_seed_resize():
    shape = (1, 4, 8, 8)
    plain = seeded_noise(shape, torch.Generator().manual_seed(1))
    assert torch.equal(seeded_noise(shape, torch.Generator().manual_seed(1), 9, 0.0), plain)
    toward = seeded_noise(shape, torch.Generator().manual_seed(1), 9, 1.0)
    assert torch.allclose(toward, torch.randn(shape, generator=torch.Generator().manual_seed(9)), atol=1e-5)
    small = seeded_noise(shape, torch.Generator().manual_seed(1), resize_from=(1, 4, 4, 4))
    assert torch.equal(small[..., 2:6, 2:6], torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
    big = torch.zeros(1, 1, 4, 6)
    assert torch.equal(centre_paste(torch.ones(1, 1, 2, 8), big)[0, 0].sum(0), torch.tensor([2.0] * 6))


def test_variation_seeds_change_the_image_and_are_recorded(pipe):
    plain = pipe("a red circle", steps=2, seed=3)
    varied = pipe("a red circle", steps=2, seed=3, subseed=8, subseed_strength=0.5)
    assert not np.array_equal(pixels(plain), pixels(varied))
    fields = parse_parameters(varied[0].info["parameters"])[2]
    assert fields["Variation seed"] == "8" and fields["Variation seed strength"] == "0.5"


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_doubles_the_size_and_records_it(pipe, upscaler):
    image = pipe("a red circle", steps=2, seed=3, hires=HiresFix(scale=2, steps=1, strength=0.5, upscaler=upscaler))[0]
    assert image.size == (2 * SIZE, 2 * SIZE)
    fields = parse_parameters(image.info["parameters"])[2]
    assert fields["Size"] == f"{SIZE}x{SIZE}" and fields["Hires upscale"] == "2"
    assert fields["Denoising strength"] == "0.5" and fields["Hires steps"] == "1"


def test_tiling_pads_circularly_for_the_call_only(pipe):
    plain = pipe("a red circle", steps=2, seed=3)
    tiled = pipe("a red circle", steps=2, seed=3, tiling=True)
    assert not np.array_equal(pixels(plain), pixels(tiled))
    assert all(m.padding_mode == "zeros" for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert np.array_equal(pixels(plain), pixels(pipe("a red circle", steps=2, seed=3)))


def test_masked_box_pads_and_takes_the_output_aspect():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 30, 28, 34))                    # 8 x 4 pixels
    assert masked_box(mask, 4, 32, 32) == (16, 24, 32, 40)   # padded to 16 x 12, widened to a square
    assert masked_box(mask, 100, 32, 32) == (0, 0, 64, 64)
    assert masked_box(Image.new("L", (64, 64), 0), 4, 32, 32) == (0, 0, 64, 64)


def test_inpainting_the_masked_area_only_keeps_the_rest_and_generates_at_full_size(pipe):
    init = Image.linear_gradient("L").resize((SIZE, SIZE)).convert("RGB")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (4, 4, 12, 12))
    sizes = []
    out = pipe("a red circle", steps=2, seed=1, init_image=init, mask=mask, mask_only=True, mask_padding=2,
               callback=lambda i, total, x0: sizes.append(tuple(x0.shape[-2:])))[0]
    assert out.size == (SIZE, SIZE) and sizes[0] == (SIZE // pipe.vae_scale,) * 2   # the box ran at full size
    outside = np.asarray(out)[16:, 16:].astype(int) - np.asarray(init)[16:, 16:].astype(int)
    assert np.abs(outside).max() == 0                                                # untouched outside the mask
    assert np.abs(np.asarray(out)[4:12, 4:12].astype(int) - np.asarray(init)[4:12, 4:12]).max() > 0
    with pytest.raises(NanoDiffusionError, match="needs a mask"):
        pipe("a red circle", steps=1, init_image=init, mask_only=True)
