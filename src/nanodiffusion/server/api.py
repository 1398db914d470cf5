"""The /sdapi/v1 HTTP API, shaped like the popular web UI's (AUTOMATIC1111) so its clients work unchanged.

Requests carry many fields this project does not use (hires fix, face restoration, scripts, ...): they
are accepted and ignored. Responses have the same keys: `images` (base64 PNGs), `parameters` (the request
echoed back) and `info` (a JSON *string* with the seeds, prompts and infotexts).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, HTTPException, Request
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..errors import NanoDiffusionError, choice_error
from .encoding import b64_to_image, image_to_b64
from .queue import Job, QueueFull

SCHEDULES = {"automatic": "default", "uniform": "default", "karras": "karras", "exponential": "exponential"}
MAX_SEED = 2**32
SETTABLE_OPTIONS = {"CLIP_stop_at_last_layers", "live_previews_enable", "show_progress_every_n_steps"}


@dataclass
class Limits:
    """What one request may ask for; anything beyond gets a 422 naming the limit."""

    max_side: int = 1024
    max_steps: int = 150
    max_batch: int = 8
    max_n_iter: int = 16
    max_cfg: float = 30.0


class Txt2ImgRequest(BaseModel):
    """A txt2img request; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """An img2img / inpaint request: init image(s), optional mask (white = repaint), strength."""

    init_images: list[str] | None = None
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = False
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    """The generation response: images, the request echoed back, and the info JSON string."""

    images: list[str] = Field(description="base64 PNG images, each with its parameters text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: prompt, all_prompts, seed, all_seeds, infotexts, ...")


def default_options(pipeline: Any) -> dict[str, Any]:
    """The settings /sdapi/v1/options reports (a small subset of the web UI's, with its key names)."""
    return {
        "sd_model_checkpoint": model_title(pipeline),
        "sd_checkpoint_hash": pipeline.model_hash,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": pipeline.clip_skip,
        "live_previews_enable": True,
        "show_progress_every_n_steps": 1,
    }


def model_title(pipeline: Any) -> str:
    """"name [shorthash]", the way the web UI names checkpoints."""
    return f"{pipeline.name} [{pipeline.model_hash[:10]}]" if pipeline.model_hash else pipeline.name


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
    """Reject a value outside [low, high] with a message naming the allowed range."""
    if not low <= value <= high:
        raise NanoDiffusionError(f"{name} {value} is out of range: use {low:g} to {high:g}")


def check_side(name: str, value: int, limits: Limits) -> None:
    """Sides are multiples of 8 up to the server's limit."""
    if value % 8 or not 8 <= value <= limits.max_side:
        raise NanoDiffusionError(f"{name} {value} is not allowed: use a multiple of 8 from 8 to {limits.max_side}")


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
    units = (scripts.get("controlnet") or {}).get("args") or []
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
    weight = float(unit.get("weight", 1.0))
    check_range("controlnet weight", weight, 0, 2)
    return b64_to_image(image, "controlnet image"), weight


def build_job(request: Txt2ImgRequest, pipeline: Any, options: dict[str, Any], limits: Limits,
              *, save: bool) -> Job:
    """Validate a request against the limits and turn it into the pipeline's keyword arguments."""
    sampler, schedule = sampler_and_schedule(request)
    init = mask = None
    if isinstance(request, Img2ImgRequest) and request.init_images:
        init = b64_to_image(request.init_images[0], "init_images[0]")
        if request.mask:
            init, mask = prepare_inpaint(init, b64_to_image(request.mask, "mask"), request)
    width, height = (init.width // 8 * 8, init.height // 8 * 8) if init else (pipeline.default_size,) * 2
    width = width if request.width is None else request.width
    height = height if request.height is None else request.height
    check_side("width", width, limits)
    check_side("height", height, limits)
    check_range("steps", request.steps, 1, limits.max_steps)
    check_range("batch_size", request.batch_size, 1, limits.max_batch)
    check_range("n_iter", request.n_iter, 1, limits.max_n_iter)
    cfg = pipeline.default_cfg if request.cfg_scale is None else request.cfg_scale
    check_range("cfg_scale", cfg, 0, limits.max_cfg)
    strength = request.denoising_strength if init is not None else None
    if strength is not None:
        check_range("denoising_strength", strength, 0.01, 1)
    settings = {**options, **(request.override_settings or {})}
    control_image, control_scale = controlnet_unit(request, pipeline)
    kwargs = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
        "sampler": sampler, "schedule": schedule, "cfg": cfg,
        "seed": request.seed if 0 <= request.seed < MAX_SEED else random.randrange(MAX_SEED),
        "width": width, "height": height, "batch": request.batch_size, "init_image": init,
        "strength": strength or 0.75, "mask": mask, "eta": request.eta,
        "clip_skip": int(settings.get("CLIP_stop_at_last_layers") or 1),
        "control_image": control_image, "control_scale": control_scale,
    }
    return Job(kwargs, n_iter=request.n_iter, save=save, previews=bool(settings.get("live_previews_enable", True)),
               preview_every=max(1, int(settings.get("show_progress_every_n_steps") or 1)))


def submit(request: Request, body: Txt2ImgRequest, *, save: bool) -> tuple[Job, int]:
    """Build and queue a job; bad input -> 422, full queue -> 429."""
    state = request.app.state
    try:
        job = build_job(body, state.pipeline, state.options, state.limits, save=save)
        return job, state.worker.submit(job)
    except NanoDiffusionError as error:
        raise HTTPException(422, str(error)) from None
    except QueueFull as error:
        raise HTTPException(429, str(error)) from None


def info_json(job: Job, pipeline: Any, body: Txt2ImgRequest) -> str:
    """The web UI's `info` string: what was actually generated, seeds and infotexts included."""
    kwargs, count = job.kwargs, len(job.images)
    seeds = job.seeds or [kwargs["seed"]]
    return json.dumps({
        "prompt": kwargs["prompt"], "all_prompts": [kwargs["prompt"]] * count,
        "negative_prompt": kwargs["negative_prompt"], "all_negative_prompts": [kwargs["negative_prompt"]] * count,
        "seed": seeds[0], "all_seeds": job.seeds, "subseed": -1, "all_subseeds": [-1] * count,
        "subseed_strength": 0, "width": kwargs["width"], "height": kwargs["height"],
        "sampler_name": kwargs["sampler"], "scheduler": kwargs["schedule"], "cfg_scale": kwargs["cfg"],
        "steps": kwargs["steps"], "batch_size": kwargs["batch"], "n_iter": job.n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": pipeline.name, "sd_model_hash": pipeline.model_hash[:10] or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": kwargs["strength"] if kwargs["init_image"] is not None else None,
        "extra_generation_params": {"Schedule type": kwargs["schedule"]}, "index_of_first_image": 0,
        "infotexts": [image.info.get("parameters", "") for image in job.images], "styles": body.styles or [],
        "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "clip_skip": kwargs["clip_skip"],
        "is_using_inpainting_conditioning": kwargs["mask"] is not None and pipeline.is_inpainting_model,
        "interrupted": job.interrupt, "saved": job.saved, "version": "nanodiffusion",
    })


async def generate(request: Request, body: Txt2ImgRequest) -> ImagesResponse:
    """Queue the request, wait for the worker, answer with the web UI's response shape."""
    job, _ = submit(request, body, save=body.save_images)
    await anyio.to_thread.run_sync(job.done.wait, abandon_on_cancel=True)
    if job.status == "failed":
        raise HTTPException(job.error_status, job.error)
    echo = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        echo["init_images"], echo["mask"] = None, None
    images = [image_to_b64(image) for image in job.images] if body.send_images else []
    return ImagesResponse(images=images, parameters=echo, info=info_json(job, request.app.state.pipeline, body))


router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])


@router.post("/txt2img", response_model=ImagesResponse)
async def txt2img(request: Request, body: Txt2ImgRequest) -> ImagesResponse:
    """Text to image."""
    return await generate(request, body)


@router.post("/img2img", response_model=ImagesResponse)
async def img2img(request: Request, body: Img2ImgRequest) -> ImagesResponse:
    """Image to image; with `mask`, inpainting (white = repaint)."""
    if not body.init_images:
        raise HTTPException(422, "init_images is empty: send one base64 image to start from")
    return await generate(request, body)


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """Progress of the running job, with the latest x0 preview as base64 PNG."""
    worker = request.app.state.worker
    job = worker.current
    state = {"skipped": bool(job and job.skip), "interrupted": bool(job and job.interrupt),
             "stopping_generation": False, "job": f"job {job.id}" if job else "",
             "job_count": worker.job_count(), "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
             "job_no": job.iteration if job else 0, "sampling_step": job.step if job else 0,
             "sampling_steps": job.total if job else 0}
    return {"progress": job.progress if job else 0.0, "eta_relative": job.eta if job else 0.0, "state": state,
            "current_image": None if skip_current_image or not job else job.preview, "textinfo": None}


@router.post("/interrupt")
def interrupt(request: Request) -> None:
    """Stop the running job; the images finished so far are returned to its caller."""
    request.app.state.worker.interrupt()


@router.post("/skip")
def skip(request: Request) -> None:
    """Skip the running iteration and go on with the next."""
    request.app.state.worker.skip()


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    """Every sampler in the registry, by display name, with its id as an alias."""
    from ..samplers import SAMPLERS

    return [{"name": info.display_name, "aliases": [key], "options": {}} for key, info in SAMPLERS.items()]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """The sigma spacings: automatic / uniform (the model's own), karras, exponential."""
    return [{"name": name, "label": name.capitalize(), "aliases": [ours] if ours != name else None,
             "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False}
            for name, ours in SCHEDULES.items()]


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    """The one loaded model."""
    pipe = request.app.state.pipeline
    return [{"title": model_title(pipe), "model_name": pipe.name, "hash": pipe.model_hash[:10] or None,
             "sha256": pipe.model_hash if len(pipe.model_hash) == 64 else None,
             "filename": pipe.name, "config": None}]


@router.get("/options")
def get_options(request: Request) -> dict[str, Any]:
    """Current settings."""
    return request.app.state.options


@router.post("/options")
def set_options(request: Request, body: dict[str, Any]) -> None:
    """Update the settings this server knows; others (and model switches) are accepted and ignored."""
    options = request.app.state.options
    for key in SETTABLE_OPTIONS & body.keys():
        kind = type(options[key])
        try:
            options[key] = body[key] in (True, 1, "true", "True") if kind is bool else kind(body[key])
        except (TypeError, ValueError):
            raise HTTPException(422, f"option {key} must be a {kind.__name__}, not {body[key]!r}") from None


def lora_files(pipeline: Any) -> list[Path]:
    """LoRA files in the server's LoRA folder (what `<lora:NAME:W>` prompt tags resolve to)."""
    folder = getattr(pipeline, "lora_dir", None)
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.suffix in (".safetensors", ".pt", ".ckpt"))


@router.get("/loras")
def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA folder's files, as the popular web UI lists them (use them with <lora:NAME:WEIGHT>)."""
    from ..lora_files import read_metadata

    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": read_metadata(p)}
            for p in lora_files(request.app.state.pipeline)]


@router.get("/sd-vae")
@router.get("/upscalers")
@router.get("/prompt-styles")
def empty_list() -> list:
    """Lists clients ask for that this server has nothing in."""
    return []


@router.post("/refresh-checkpoints")
def refresh_checkpoints() -> None:
    """Nothing to refresh: the model is loaded once at start."""
