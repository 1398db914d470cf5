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
from .encoding import b64_to_image
from .queue import Job
from .schema import Img2ImgRequest, Limits, Options, Txt2ImgRequest

SCHEDULES = {"automatic": "default", "uniform": "default", "karras": "karras", "exponential": "exponential"}
MAX_SEED = 2**32


def sampler_and_schedule(request: Txt2ImgRequest) -> tuple[str, str]:
    """Resolve sampler_name / sampler_index (display names, old "X Karras" names) and the scheduler."""
    from ..samplers import get_sampler

    name = (request.sampler_name or request.sampler_index or "Euler a").strip()
    schedule = (request.scheduler or "automatic").strip().lower()
    for suffix in ("karras", "exponential"):
        if name.lower().endswith(" " + suffix):
            name, schedule = name[: -len(suffix) - 1], suffix
    if schedule not in SCHEDULES:
        raise choice_error("scheduler", request.scheduler, list(SCHEDULES))
    try:
        return get_sampler(name).display_name, SCHEDULES[schedule]
    except ValueError as error:
        raise NanoDiffusionError(str(error)) from None


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


def check_options(options: Options, pipeline: Any) -> dict[str, Any]:
    """The settings an Options body sets (None = not set), checked against the loaded model."""
    chosen = options.model_dump(include=set(Options.model_fields), exclude_none=True)
    layers = clip_layers(pipeline)
    if chosen.get("CLIP_stop_at_last_layers", 1) > layers:
        raise NanoDiffusionError(f"CLIP_stop_at_last_layers {chosen['CLIP_stop_at_last_layers']} is out of range: "
                                 f"this model's text encoder has {layers} layers, use 1 to {layers}")
    return chosen


def check_prompts(request: Txt2ImgRequest, pipeline: Any) -> None:
    """Length, encoding, `<lora:>` tags (syntax, weights, files) and emphasis syntax of both prompts."""
    check_prompt(request.prompt, "prompt")
    check_prompt(request.negative_prompt, "negative prompt")
    text, _ = resolve_lora_tags(request.prompt, getattr(pipeline, "lora_dir", None))
    parse_emphasis(text)
    parse_emphasis(request.negative_prompt)


def prepare_inpaint(image: Image.Image, mask: Image.Image, request: Img2ImgRequest) -> tuple[Image.Image, Image.Image]:
    """Mask basics: invert, blur its edge; inpainting_fill 0 ("fill") paints the hole with its surroundings first."""
    mask = mask.convert("L").resize(image.size)
    if request.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if request.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    if request.inpainting_fill == 0:
        image = Image.composite(fill_from_surroundings(image, mask), image.convert("RGB"), mask)
    return image, mask


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
              *, save: bool) -> Job:
    """Validate a request against the limits and turn it into the pipeline's keyword arguments."""
    sampler, schedule = sampler_and_schedule(request)
    check_range("steps", request.steps, 1, limits.max_steps)
    check_range("batch_size", request.batch_size, 1, limits.max_batch)
    check_range("n_iter", request.n_iter, 1, limits.max_n_iter)
    cfg = pipeline.default_cfg if request.cfg_scale is None else request.cfg_scale
    check_range("cfg_scale", cfg, 0, limits.max_cfg)
    check_prompts(request, pipeline)
    settings = {**options, **check_options(request.override_settings or Options(), pipeline)}
    init = mask = None
    if isinstance(request, Img2ImgRequest) and request.init_images:
        init = b64_to_image(request.init_images[0], "init_images[0]")
        if request.mask:
            init, mask = prepare_inpaint(init, b64_to_image(request.mask, "mask"), request)
    width, height = init_size(init) if init is not None and None in (request.width, request.height) else (
        (pipeline.default_size,) * 2)
    width = width if request.width is None else request.width
    height = height if request.height is None else request.height
    check_side("width", width, limits)
    check_side("height", height, limits)
    strength = request.denoising_strength if init is not None else None
    if strength is not None:
        check_range("denoising_strength", strength, 0.01, 1)
    control_image, control_scale = controlnet_unit(request, pipeline)
    kwargs = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
        "sampler": sampler, "schedule": schedule, "cfg": cfg,
        "seed": request.seed if 0 <= request.seed < MAX_SEED else random.randrange(MAX_SEED),
        "width": width, "height": height, "batch": request.batch_size, "init_image": init,
        "strength": strength or 0.75, "mask": mask, "eta": request.eta,
        "clip_skip": settings["CLIP_stop_at_last_layers"], "control_image": control_image,
        "control_scale": control_scale,
    }
    return Job(kwargs, n_iter=request.n_iter, save=save, previews=settings["live_previews_enable"],
               preview_every=settings["show_progress_every_n_steps"])
