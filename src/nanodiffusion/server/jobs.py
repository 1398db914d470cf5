"""A validated request -> a queued Job: sampler names, limits, images, prompt syntax, settings, ControlNet units.

`build_job` does every check that can fail before the model runs (so a bad request is a 422, see the package
docstring) and all the image work (decoding, mask blur, hole filling). It is slow for big images, so the API
runs it on a worker thread, never on the event loop.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import NanoDiffusionError, choice_error
from ..lora_files import resolve_lora_tags
from ..prompts import check_prompt, parse_emphasis
from ..request import HiresFix
from ..sampler_names import resolve_sampler
from ..samplers import SAMPLERS
from ..styles import Style, apply_styles
from .encoding import b64_to_image
from .fields import check_unsupported
from .model_library import Checkpoint, ModelLibrary
from .queue import Job
from .schema import Img2ImgRequest, Limits, Options, Txt2ImgRequest

RANDOM_SEEDS = 2**32 - 2   # a random seed is below this, as the web UI draws them
SEED_LIMIT = 2**64         # torch.Generator.manual_seed takes 0 .. 2**64 - 1
REFINER_SWITCH_AT = 0.8   # the web UI's default fraction of the steps after which the refiner takes over
VAES = ("Automatic", "None", "")   # the only sd_vae values: the checkpoint's own VAE
RESIZE_MODES = {0: "just resize", 1: "crop and resize"}
SCRIPTS = ("controlnet",)
# the web UI's hires upscalers this project has (request.HiresFix.upscaler); None: the web UI's default
HIRES_UPSCALERS = {None: "latent", "Latent": "latent", "Latent (nearest)": "latent-nearest", "Lanczos": "lanczos"}


def sampler_and_schedule(request: Txt2ImgRequest) -> tuple[str, str, list[str]]:
    """sampler_name / sampler_index and scheduler -> (sampler display name, our spacing, fall-back warnings)."""
    key, schedule, warnings = resolve_sampler(request.sampler_name or request.sampler_index, request.scheduler)
    return SAMPLERS[key].display_name, schedule, warnings


def resolve_seed(request: Txt2ImgRequest) -> int:
    """-1 (or none): a random seed; 0 .. 2**64 - 1 are used as given (each image takes the next one)."""
    if request.seed in (-1, None):
        return random.randrange(RANDOM_SEEDS)
    last = request.seed + request.batch_size * request.n_iter - 1
    if request.seed < 0 or last >= SEED_LIMIT:
        raise NanoDiffusionError(f"seed {request.seed} is out of range: use -1 (random) or 0 to "
                                 f"{SEED_LIMIT - request.batch_size * request.n_iter}")
    return request.seed


def hires_fix(request: Txt2ImgRequest, width: int, height: int, limits: Limits) -> HiresFix:
    """enable_hr and its hr_* fields -> the pipeline's HiresFix, its size and steps within the limits."""
    if request.hr_upscaler not in HIRES_UPSCALERS:
        raise choice_error("hr_upscaler", request.hr_upscaler, [name for name in HIRES_UPSCALERS if name])
    check_range("hr_second_pass_steps", request.hr_second_pass_steps, 0, limits.max_steps)
    strength = 0.7 if request.denoising_strength is None else request.denoising_strength
    check_range("denoising_strength", strength, 0.01, 1)
    hires = HiresFix(scale=request.hr_scale, steps=request.hr_second_pass_steps, strength=strength,
                     upscaler=HIRES_UPSCALERS[request.hr_upscaler], width=request.hr_resize_x,
                     height=request.hr_resize_y)
    for name, side in zip(("hires width", "hires height"), hires.target(width, height)):
        check_side(name, side, limits)
    return hires


def generation_extras(request: Txt2ImgRequest, width: int, height: int, limits: Limits) -> dict[str, Any]:
    """The keywords of features a request turns on (variation seeds, seed resize, tiling, hires fix, inpainting
    the masked area only); none when off, so pipelines without them keep working."""
    extras: dict[str, Any] = {}
    if request.subseed_strength > 0:
        subseed = random.randrange(RANDOM_SEEDS) if request.subseed == -1 else request.subseed
        extras.update(subseed=subseed, subseed_strength=request.subseed_strength)
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        extras["seed_resize_from"] = (request.seed_resize_from_w, request.seed_resize_from_h)
    if request.tiling:
        extras["tiling"] = True
    if request.enable_hr and not isinstance(request, Img2ImgRequest):   # the web UI's img2img has no hires fix
        extras["hires"] = hires_fix(request, width, height, limits)
    if isinstance(request, Img2ImgRequest) and request.mask and request.inpaint_full_res:
        extras.update(mask_only=True, mask_padding=request.inpaint_full_res_padding)
    return extras


def refiner_checkpoint(request: Txt2ImgRequest, library: ModelLibrary | None) -> Checkpoint | None:
    """The checkpoint a request names as its refiner (None: no refiner, as "" and "None" say in the web UI)."""
    name = request.refiner_checkpoint
    if name is None or name.strip() in ("", "None"):
        return None
    if library is None:
        raise NanoDiffusionError("refiner_checkpoint needs a server that can load checkpoints: start it with "
                                 "--models-dir holding the refiner")
    return library.find(name)


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Reject a value outside [low, high] (NaN included) with a message naming the allowed range."""
    if not low <= value <= high:
        raise NanoDiffusionError(f"{name} {value} is out of range: use {low:g} to {high:g}")


def check_side(name: str, value: int, limits: Limits) -> None:
    """Sides are multiples of 8 up to the server's limit."""
    if value % 8 or not 8 <= value <= limits.max_side:
        raise NanoDiffusionError(f"{name} {value} is not allowed: use a multiple of 8 from 8 to {limits.max_side}")


def clip_layers(pipeline: Any) -> int:
    """How many text-encoder layers the model has (the most CLIP_stop_at_last_layers can skip to); 12 if unknown."""
    config = getattr(getattr(pipeline, "text_encoder", None), "config", None)
    return getattr(config, "num_hidden_layers", 12)


def check_options(options: Options, pipeline: Any, library: ModelLibrary | None = None) -> dict[str, Any]:
    """The settings an Options body sets (None = not set), checked against the loaded model; a checkpoint name
    becomes that checkpoint's title."""
    chosen = options.model_dump(include=set(Options.model_fields), exclude_none=True)
    layers = clip_layers(pipeline)
    if chosen.get("CLIP_stop_at_last_layers", 1) > layers:
        raise NanoDiffusionError(f"CLIP_stop_at_last_layers {chosen['CLIP_stop_at_last_layers']} is out of range: "
                                 f"this model's text encoder has {layers} layers, use 1 to {layers}")
    if chosen.get("sd_vae", "") not in VAES:
        raise NanoDiffusionError(f"sd_vae {chosen['sd_vae']!r} is not available: this server uses each "
                                 "checkpoint's own VAE, send \"Automatic\"")
    if "sd_model_checkpoint" in chosen and library is not None:
        chosen["sd_model_checkpoint"] = library.find(chosen["sd_model_checkpoint"]).title
    return chosen


def check_scripts(request: Txt2ImgRequest) -> None:
    """Scripts this server has none of are refused, as the web UI refuses scripts it lacks."""
    for name in request.alwayson_scripts or {}:
        if name.lower() not in SCRIPTS:
            raise NanoDiffusionError(f"always on script {name} not found: this server has "
                                     f"{', '.join(SCRIPTS)} only")


def check_prompts(request: Txt2ImgRequest, pipeline: Any) -> None:
    """Length, encoding, `<lora:>` tags (syntax, weights, files) and emphasis syntax of both prompts."""
    check_prompt(request.prompt, "prompt")
    check_prompt(request.negative_prompt, "negative prompt")
    text, _ = resolve_lora_tags(request.prompt, getattr(pipeline, "lora_dir", None))
    parse_emphasis(text)
    parse_emphasis(request.negative_prompt)


def prepare_inpaint(image: Image.Image, mask: Image.Image, request: Img2ImgRequest) -> tuple[Image.Image, Image.Image]:
    """Mask basics: invert, blur its edge (mask_blur, else mask_blur_x across and mask_blur_y down); inpainting_fill
    0 ("fill") paints the hole with its surroundings first."""
    mask = mask.convert("L").resize(image.size)
    if request.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = request.mask_blur
    blur_x, blur_y = (request.mask_blur_x, request.mask_blur_y) if blur is None else (blur, blur)
    mask = blur_mask(mask, blur_x, blur_y)
    if request.inpainting_fill == 0:
        image = Image.composite(fill_from_surroundings(image, mask), image.convert("RGB"), mask)
    return image, mask


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """The web UI's mask blur (modules/processing.py, StableDiffusionProcessingImg2Img.init): a Gaussian of standard
    deviation blur_x across, then one of blur_y down, each `cv2.GaussianBlur` with 2 * int(2.5 * blur + 0.5) + 1
    taps and mirrored edges (BORDER_REFLECT_101), back to 8 bits after each; here in numpy, equal to OpenCV's
    within one grey level (its 8-bit path rounds the kernel to fixed point)."""
    pixels = np.asarray(mask.convert("L"))
    for axis, blur in ((1, blur_x), (0, blur_y)):
        if blur > 0:
            pixels = np.rint(gaussian_along(pixels.astype(np.float32), blur, axis)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def gaussian_along(pixels: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """A 1-D Gaussian blur along one axis: OpenCV's kernel (getGaussianKernel) and edge rule (reflect, edge once)."""
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-np.arange(-radius, radius + 1, dtype=np.float64) ** 2 / (2 * sigma**2))
    taps = (taps / taps.sum()).astype(np.float32)
    padding = [(0, 0), (0, 0)]
    padding[axis] = (radius, radius)
    padded = np.pad(pixels, padding, mode="reflect")
    length = pixels.shape[axis]
    out = np.zeros_like(pixels)
    for offset, weight in enumerate(taps):
        out += weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
    return out


def fill_from_surroundings(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Normalised convolution: blur(image * keep) / blur(keep), so the hole takes its neighbours' colours."""
    keep = ImageOps.invert(mask)
    kept = Image.composite(image.convert("RGB"), Image.new("RGB", image.size), keep)
    radius = ImageFilter.GaussianBlur(max(image.size) / 8)
    total = np.asarray(kept.filter(radius), dtype=np.float32)
    weight = np.asarray(keep.filter(radius), dtype=np.float32)[..., None] / 255
    return Image.fromarray((total / np.maximum(weight, 1 / 255)).clip(0, 255).astype(np.uint8))


def controlnet_unit(request: Txt2ImgRequest, pipeline: Any) -> tuple[Image.Image | None, float]:
    """The first enabled unit of the ControlNet extension's `alwayson_scripts.controlnet.args` -> (image, weight)."""
    scripts = {key.lower(): value for key, value in (request.alwayson_scripts or {}).items()}
    script = scripts.get("controlnet") or {}
    if not isinstance(script, dict) or not isinstance(script.get("args") or [], list):
        raise NanoDiffusionError('alwayson_scripts.controlnet must look like {"args": [{"image": ..., "weight": 1}]}')
    units = script.get("args") or []
    unit = next((u for u in units if isinstance(u, dict) and u.get("enabled", True)), None)
    if unit is None:
        return None, 1.0
    if getattr(pipeline, "controlnet", None) is None:
        raise NanoDiffusionError("this server has no ControlNet loaded: start it with --controlnet FILE")
    if str(unit.get("module") or "none").lower() != "none":
        raise NanoDiffusionError(f"ControlNet preprocessor {unit['module']!r} is not available on this server: "
                                 "send an already preprocessed control image with module \"none\"")
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):
        image = image.get("image")
    if not isinstance(image, str):
        raise NanoDiffusionError("the ControlNet unit needs an image (base64) in 'image' or 'input_image'")
    weight = unit.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise NanoDiffusionError(f"controlnet weight must be a number, not {type(weight).__name__}")
    check_range("controlnet weight", weight, 0, 2)
    return b64_to_image(image, "controlnet image"), float(weight)


def init_size(image: Image.Image) -> tuple[int, int]:
    """The generation size an init image gives when the request names none: its size down to multiples of 8."""
    if min(image.size) < 8:
        raise NanoDiffusionError(f"init_images[0] is {image.width}x{image.height} pixels: send at least 8x8, "
                                 "or set width and height to scale it")
    return image.width // 8 * 8, image.height // 8 * 8


def build_job(request: Txt2ImgRequest, pipeline: Any, options: dict[str, Any], limits: Limits,
              *, save: bool, styles: dict[str, Style] | None = None, library: ModelLibrary | None = None) -> Job:
    """Validate a request against the limits and turn it into the pipeline's keyword arguments."""
    check_unsupported(request.model_dump())
    check_scripts(request)
    sampler, schedule, warnings = sampler_and_schedule(request)
    check_range("steps", request.steps, 1, limits.max_steps)
    check_range("batch_size", request.batch_size, 1, limits.max_batch)
    check_range("n_iter", request.n_iter, 1, limits.max_n_iter)
    cfg = pipeline.default_cfg if request.cfg_scale is None else request.cfg_scale
    check_range("cfg_scale", cfg, 0, limits.max_cfg)
    prompt, negative = apply_styles(request.prompt, request.negative_prompt, request.styles or [], styles or {})
    request = request.model_copy(update={"prompt": prompt, "negative_prompt": negative})
    check_prompts(request, pipeline)
    settings = {**options, **check_options(request.override_settings or Options(), pipeline, library)}
    checkpoint = library.find(settings["sd_model_checkpoint"]) if library is not None else None
    init = mask = None
    if isinstance(request, Img2ImgRequest) and request.init_images:
        if request.resize_mode not in RESIZE_MODES:
            raise choice_error("resize_mode", request.resize_mode, [f"{k} ({v})" for k, v in RESIZE_MODES.items()])
        init = b64_to_image(request.init_images[0], "init_images[0]")
        if request.mask:
            init, mask = prepare_inpaint(init, b64_to_image(request.mask, "mask"), request)
    width, height = init_size(init) if init is not None and None in (request.width, request.height) else (
        (pipeline.default_size,) * 2)
    width = width if request.width is None else request.width
    height = height if request.height is None else request.height
    check_side("width", width, limits)
    check_side("height", height, limits)
    if init is not None and request.resize_mode == 1:
        init = ImageOps.fit(init, (width, height), Image.Resampling.LANCZOS)
        mask = None if mask is None else ImageOps.fit(mask, (width, height), Image.Resampling.LANCZOS)
    strength = request.denoising_strength if init is not None else None
    if strength is not None:
        check_range("denoising_strength", strength, 0.01, 1)
    control_image, control_scale = controlnet_unit(request, pipeline)
    kwargs = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
        "sampler": sampler, "schedule": schedule, "cfg": cfg,
        "seed": resolve_seed(request),
        "width": width, "height": height, "batch": request.batch_size, "init_image": init,
        "strength": strength or 0.75, "mask": mask, "eta": request.eta,
        "clip_skip": settings["CLIP_stop_at_last_layers"], "control_image": control_image,
        "control_scale": control_scale, **generation_extras(request, width, height, limits),
    }
    refiner = refiner_checkpoint(request, library)
    if refiner is not None:
        switch = REFINER_SWITCH_AT if request.refiner_switch_at is None else request.refiner_switch_at
        check_range("refiner_switch_at", switch, 0.01, 1)
        kwargs["refiner_switch_at"] = switch
    job = Job(kwargs, n_iter=request.n_iter, save=save, previews=settings["live_previews_enable"],
              preview_every=settings["show_progress_every_n_steps"], warnings=warnings, checkpoint=checkpoint,
              refiner=refiner)
    if request.force_task_id:
        job.id = request.force_task_id
    return job
