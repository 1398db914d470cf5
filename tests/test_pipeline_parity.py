"""A tiny random SD pipeline saved by diffusers gives the same images through our Pipeline (<= 2/255)."""

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.images import mask_to_tensor, to_pil, to_tensor
from nanodiffusion.pipeline import Pipeline
from oracles import clip_tokenizer_dir, require

diffusers = require("diffusers")
transformers = require("transformers")

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    num_train_timesteps=1000)
# our sampler id, schedule -> diffusers scheduler class and the extra config the web UI's name implies
SCHEDULERS = {
    ("ddim", "default"): ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    ("plms", "default"): ("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=False)),
    ("euler", "default"): ("EulerDiscreteScheduler", {}),
    ("euler_a", "default"): ("EulerAncestralDiscreteScheduler", {}),
    ("heun", "default"): ("HeunDiscreteScheduler", {}),
    ("dpmpp_2m", "default"): ("DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m", "karras"): ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("unipc", "default"): ("UniPCMultistepScheduler", {}),
}
SIZE = 64
STEPS = 8
PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry"


def tiny_components(in_channels: int = 4) -> dict:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=SIZE // 2, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=37, num_attention_heads=1, num_hidden_layers=3,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=77)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def scheduler(sampler: str, schedule: str, config: dict | None = None):
    """The diffusers scheduler for a sampler, made the way users switch it: from the model's own config."""
    name, extra = SCHEDULERS[(sampler, schedule)]
    return getattr(diffusers, name).from_config({**(config or SD_SCHEDULER), **extra})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders written by diffusers' save_pretrained: an ordinary and a 9-channel inpainting model."""
    folders = {}
    for kind, channels in (("plain", 4), ("inpaint", 9)):
        pipe = diffusers.StableDiffusionPipeline(**tiny_components(channels),
                                                 scheduler=scheduler("ddim", "default"))
        folders[kind] = tmp_path_factory.mktemp(kind)
        pipe.save_pretrained(folders[kind])
    return folders


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


TOLERANCE = 2 / 255


def assert_not_flat(images: np.ndarray) -> None:
    """Every image varies far more than the parity tolerance, so a match within it means something."""
    spreads = images.reshape(len(images), -1).std(axis=1)
    assert spreads.min() > 10 * TOLERANCE, spreads


def assert_matches(ours: list[Image.Image], expected: np.ndarray) -> None:
    """Our images equal diffusers' within TOLERANCE, on images that are not flat."""
    assert_not_flat(np.asarray(expected))
    assert np.abs(pixels(ours) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("sampler,schedule", list(SCHEDULERS))
def test_txt2img_matches_diffusers(saved, sampler, schedule):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(saved["plain"], safety_checker=None)
    ref.scheduler = scheduler(sampler, schedule, ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0,
                   height=SIZE, width=SIZE, num_images_per_prompt=2, generator=generators(7, 2),
                   output_type="np").images
    ours = Pipeline.load(saved["plain"])(PROMPT, NEGATIVE, steps=STEPS, sampler=sampler, schedule=schedule,
                                         cfg=6.0, seed=7, batch=2, width=SIZE, height=SIZE)
    assert_matches(ours, expected)


def init_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(saved, sampler):
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(saved["plain"], safety_checker=None)
    ref.scheduler = scheduler(sampler, "default", ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, image=init_image(), strength=0.6, num_inference_steps=STEPS, guidance_scale=5.0,
                   generator=generators(3, 1), output_type="np").images
    ours = Pipeline.load(saved["plain"])(PROMPT, steps=STEPS, sampler=sampler, cfg=5.0, seed=3,
                                         width=SIZE, height=SIZE, init_image=init_image(), strength=0.6)
    assert_matches(ours, expected)


def mask_image() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_model_matches_diffusers(saved, strength):
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(saved["inpaint"], safety_checker=None)
    ref.scheduler = scheduler("euler", "default", ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, image=init_image(), mask_image=mask_image(), strength=strength, height=SIZE,
                   width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0, generator=generators(5, 1),
                   output_type="np").images
    ours = Pipeline.load(saved["inpaint"])(PROMPT, steps=STEPS, sampler="euler", cfg=5.0, seed=5, width=SIZE,
                                           height=SIZE, init_image=init_image(), mask=mask_image(),
                                           strength=strength)
    assert_matches(ours, expected)


def test_inpainting_ordinary_model_keeps_the_known_region(saved):
    """Latent pinning: the final sample (what the VAE decodes into the returned image) is the encoded init image
    outside the mask and new content inside it."""
    pipe = Pipeline.load(saved["plain"])
    decoded, decode = {}, pipe.decode

    def keep_final(latents: torch.Tensor) -> torch.Tensor:
        decoded["final"] = latents.clone()
        return decode(latents)

    pipe.decode = keep_final
    images = pipe(PROMPT, steps=STEPS, sampler="euler", cfg=5.0, seed=5, width=SIZE, height=SIZE,
                  init_image=init_image(), mask=mask_image(), strength=1.0)
    known = pipe.encode_image(to_tensor(init_image()), generators(5, 1))
    keep = torch.nn.functional.interpolate(mask_to_tensor(mask_image(), (SIZE, SIZE)), size=known.shape[-2:]) == 0
    keep = keep.expand_as(known)
    final = decoded["final"]
    assert torch.allclose(final[keep], known[keep], atol=1e-4)   # fp32 rounding, any thread count
    assert (final[~keep] - known[~keep]).abs().mean() > 10 * known.std()
    assert_not_flat(pixels(images))
    # the returned image is that sample decoded (up to 8-bit rounding: the pipeline decodes on its own thread budget)
    assert np.abs(pixels(images) - pixels(to_pil(decode(final)))).max() <= 1 / 255 + 1e-9


def test_original_single_file_matches_the_folder(saved, published, tmp_path):
    """A single file in the original SD 1.x key layout (no metadata: configs inferred) gives the images of the
    folder carrying the published SD 1.5 scheduler config (no timestep_spacing: Euler a runs "linspace")."""
    from safetensors.torch import save_file

    from nanodiffusion.checkpoint_keys import diffusers_to_original
    from nanodiffusion.checkpoints import load_checkpoint

    folder = load_checkpoint(saved["plain"])
    single = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_original(folder.parts).items()}, single)
    kw = dict(steps=4, sampler="euler_a", cfg=5.0, seed=9, width=SIZE, height=SIZE)
    expected = published["sd15"][2](PROMPT, **kw)
    ours = Pipeline.load(single)(PROMPT, **kw)
    assert_not_flat(pixels(expected))
    assert np.abs(pixels(ours) - pixels(expected)).max() == 0


@pytest.mark.parametrize("sampler,schedule", [("euler_a", "default"), ("heun", "default"), ("dpmpp_2m", "karras")])
def test_few_steps_match_too(saved, sampler, schedule):
    """With 3 leading-spaced steps sigma_0 is small (~2.9), so the start x_T = noise * sqrt(1 + sigma_0^2) that
    diffusers uses differs visibly from k-diffusion's noise * sigma_0, and the multistep solvers' whole-number
    timesteps differ from the exact t(sigma) of Karras sigmas: we follow diffusers in both."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(saved["plain"], safety_checker=None)
    ref.scheduler = scheduler(sampler, schedule, ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, num_inference_steps=3, guidance_scale=7.0, height=SIZE, width=SIZE,
                   generator=generators(42, 1), output_type="np").images
    ours = Pipeline.load(saved["plain"])(PROMPT, steps=3, sampler=sampler, schedule=schedule, cfg=7.0, seed=42,
                                         width=SIZE, height=SIZE)
    assert_matches(ours, expected)


def test_turbo_style_single_step_without_guidance_matches_diffusers(saved, tmp_path):
    """SD-Turbo's recipe (stabilityai/sd-turbo: EulerDiscreteScheduler, "trailing" spacing; 1 step at t = 999,
    guidance_scale=0.0, which diffusers reads as no guidance): the same image through our Pipeline."""
    import json
    import shutil

    folder = tmp_path / "turbo"
    shutil.copytree(saved["plain"], folder)
    config = {**SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                   generator=generators(5, 1), output_type="np").images
    ours = Pipeline.load(folder)(PROMPT, num_inference_steps=1, guidance_scale=0.0, sampler="euler",
                                 generator=generators(5, 1)[0], width=SIZE, height=SIZE)
    assert_matches(ours, expected)


# The scheduler_config.json texts the released checkpoints publish (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1). Neither has "timestep_spacing": each diffusers scheduler then uses its own
# default ("leading" for DDIM / PNDM / DDPM, "linspace" for the others), and so must each of our samplers.
PUBLISHED = {
    "sd15": '{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": '
            '"scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false, '
            '"skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}',
    "sd21": '{"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012, "beta_schedule": '
            '"scaled_linear", "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000, '
            '"prediction_type": "v_prediction", "set_alpha_to_one": false, "skip_prk_steps": true, '
            '"steps_offset": 1, "trained_betas": null}',
}
# every sampler with a diffusers counterpart -> that scheduler and the options its web-UI name implies
# (DPM++ SDE draws from a Brownian tree, DPM++ 2S a and Langevin have no diffusers scheduler)
MIRRORS = {
    "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {}), "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {}),
}


@pytest.fixture(scope="module")
def published(saved, tmp_path_factory):
    """Per published config: the tiny folder carrying it, diffusers' pipeline and ours loaded from it."""
    import shutil

    out = {}
    for name, text in PUBLISHED.items():
        folder = tmp_path_factory.mktemp(name) / "model"
        shutil.copytree(saved["plain"], folder)
        (folder / "scheduler" / "scheduler_config.json").write_text(text)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        out[name] = (ref, ref.scheduler.config, Pipeline.load(folder))
    return out


# diffusers' PNDM extrapolates a v model's raw outputs and converts the sum to eps at the current x; PLMS here (as
# the paper and the original LDM / web-UI PLMS do) extrapolates each step's own eps, so SD 2.1 + PLMS is left out.
PUBLISHED_CASES = [(c, s) for c in PUBLISHED for s in MIRRORS if (c, s) != ("sd21", "plms")]


@pytest.mark.parametrize("config,sampler", PUBLISHED_CASES)
def test_published_configs_match_diffusers(published, config, sampler):
    """Users switch schedulers with from_config(pipe.scheduler.config): keys the file lacks take that class's
    defaults. Ours must give the same image from the same folder, for every sampler."""
    ref, scheduler_config, ours = published[config]
    name, extra = MIRRORS[sampler]
    ref.scheduler = getattr(diffusers, name).from_config(scheduler_config, **extra)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE,
                   width=SIZE, num_images_per_prompt=2, generator=generators(11, 2), output_type="np").images
    images = ours(PROMPT, NEGATIVE, steps=STEPS, sampler=sampler, cfg=6.0, seed=11, batch=2, width=SIZE, height=SIZE)
    assert ours.prediction == ("v_prediction" if config == "sd21" else "epsilon")
    assert_matches(images, expected)
