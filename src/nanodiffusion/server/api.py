"""The /sdapi/v1 HTTP API, shaped like the popular web UI's (AUTOMATIC1111) so its clients work unchanged.

Bodies are in schema.py, their checks and the job they become in jobs.py. Responses have the web UI's keys:
`images` (base64 PNGs), `parameters` (the request echoed back) and `info` (a JSON *string* with the seeds,
prompts and infotexts). Status codes follow the package docstring's rule. Handlers stay responsive: request
preparation runs on a worker thread (a few at a time), waiting for a job polls, and a client that hangs up
has its job cancelled.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request

from ..errors import NanoDiffusionError
from ..lora_files import SUFFIXES, read_metadata
from ..sampler_names import scheduler_label
from .encoding import image_to_b64
from .errors import public_message, server_folders
from .jobs import build_job, check_options
from .queue import Job, QueueFull
from .schema import ImagesResponse, Img2ImgRequest, Options, Txt2ImgRequest
from .xyz_script import is_xyz_plot, script_job

PREPARING_AT_ONCE = 2      # requests decoding images / parsing prompts at the same time
WAIT_POLL_SECONDS = 0.05   # how often a waiting request checks its job and its client
DERIVED_OPTIONS = {"sd_checkpoint_hash"}   # follows sd_model_checkpoint; a posted value is ignored


def default_options(pipeline: Any) -> dict[str, Any]:
    """The settings /sdapi/v1/options reports, with the web UI's key names; Options lists those that can be set,
    the others describe this server and a POST may only repeat them."""
    return {
        "sd_model_checkpoint": model_title(pipeline),
        "sd_checkpoint_hash": pipeline.model_hash,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": pipeline.clip_skip,
        "live_previews_enable": True,
        "show_progress_every_n_steps": 1,
        "live_preview_content": "Combined",
        "randn_source": "CPU",
        "eta_noise_seed_delta": 0,
        "sd_checkpoints_limit": 1,
        "sd_vae_as_default": True,
        "nanodiffusion_precision": pipeline.precision,
    }


def check_fixed_options(body: Options, options: dict[str, Any]) -> None:
    """A POST may repeat the settings this server cannot change (clients post back what they got), not alter them."""
    for key, value in (body.model_extra or {}).items():
        if key in options and key not in DERIVED_OPTIONS and value != options[key]:
            raise NanoDiffusionError(f"option {key} is fixed on this server to {options[key]!r}: leave it out")


def model_title(pipeline: Any) -> str:
    """"name [shorthash]", the way the web UI names checkpoints."""
    return f"{pipeline.name} [{pipeline.model_hash[:10]}]" if pipeline.model_hash else pipeline.name


async def submit(request: Request, body: Txt2ImgRequest, *, save: bool) -> tuple[Job, int]:
    """Build (on a worker thread) and queue a job; bad input -> 422, full queue -> 429."""
    state = request.app.state
    if not state.worker.has_room():
        raise HTTPException(429, state.worker.full_message())
    if getattr(state, "preparing", None) is None:
        state.preparing = anyio.CapacityLimiter(PREPARING_AT_ONCE)
    build = script_job if is_xyz_plot(body) else build_job
    try:
        job = await anyio.to_thread.run_sync(
            lambda: build(body, state.pipeline, state.options, state.limits, save=save, styles=state.styles,
                              library=state.library), limiter=state.preparing)
        if body.override_settings is not None and not body.override_settings_restore_afterwards:
            update_options(state, body.override_settings)
        return job, state.worker.submit(job)
    except NanoDiffusionError as error:
        raise HTTPException(422, public_message(str(error), server_folders(state.pipeline, state.outputs))) from None
    except QueueFull as error:
        raise HTTPException(429, str(error)) from None


def info_json(job: Job, pipeline: Any, body: Txt2ImgRequest) -> str:
    """The web UI's `info` string: what was actually generated, seeds and infotexts included."""
    kwargs, count = job.kwargs, len(job.images)
    seeds = job.seeds or [kwargs["seed"]]
    subseed = kwargs.get("subseed", -1)
    resize_w, resize_h = kwargs.get("seed_resize_from", (-1, -1))
    return json.dumps({
        "prompt": kwargs["prompt"], "all_prompts": [kwargs["prompt"]] * count,
        "negative_prompt": kwargs["negative_prompt"], "all_negative_prompts": [kwargs["negative_prompt"]] * count,
        "seed": seeds[0], "all_seeds": job.seeds, "subseed": subseed,
        "all_subseeds": [subseed + i if subseed >= 0 else -1 for i in range(count)],
        "subseed_strength": kwargs.get("subseed_strength", 0), "width": kwargs["width"], "height": kwargs["height"],
        "sampler_name": kwargs["sampler"], "scheduler": scheduler_label(kwargs["schedule"]), "cfg_scale": kwargs["cfg"],
        "steps": kwargs["steps"], "batch_size": kwargs["batch"], "n_iter": job.n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": pipeline.name, "sd_model_hash": pipeline.model_hash[:10] or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": resize_w, "seed_resize_from_h": resize_h,
        "denoising_strength": kwargs["strength"] if kwargs["init_image"] is not None else None,
        "extra_generation_params": {"Schedule type": scheduler_label(kwargs["schedule"])}, "index_of_first_image": 0,
        "infotexts": [image.info.get("parameters", "") for image in job.images], "styles": body.styles or [],
        "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "clip_skip": kwargs["clip_skip"],
        "is_using_inpainting_conditioning": kwargs["mask"] is not None and pipeline.is_inpainting_model,
        "interrupted": job.interrupt, "saved": job.saved, "version": "nanodiffusion", "warnings": job.warnings,
        **job.details,
    })


async def generate(request: Request, body: Txt2ImgRequest) -> ImagesResponse:
    """Queue the request, wait for the worker (cancelling the job if the client hangs up), answer like the web UI."""
    job, _ = await submit(request, body, save=body.save_images)
    while not job.done.is_set():
        if await request.is_disconnected():
            request.app.state.worker.cancel(job)
            raise HTTPException(400, "client disconnected: job cancelled")
        await anyio.sleep(WAIT_POLL_SECONDS)
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
def interrupt(request: Request) -> dict:
    """Stop the running job; the images finished so far (and the one under way, as far as it got) are returned
    to its caller."""
    request.app.state.worker.interrupt()
    return {}


@router.post("/skip")
def skip(request: Request) -> None:
    """Skip the running iteration and go on with the next."""
    request.app.state.worker.skip()


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    """The model the server started with and the checkpoints of --models-dir (sha256 once loaded)."""
    return [checkpoint.item() for checkpoint in request.app.state.library.checkpoints]


@router.get("/options")
def get_options(request: Request) -> dict[str, Any]:
    """Current settings."""
    return request.app.state.options


def update_options(state: Any, body: Options) -> None:
    """Apply an Options body to the server's settings (422 for a value it cannot take)."""
    try:
        check_fixed_options(body, state.options)
        chosen = check_options(body, state.pipeline, state.library)
    except NanoDiffusionError as error:
        raise HTTPException(422, str(error)) from None
    if "sd_model_checkpoint" in chosen:
        checkpoint = state.library.find(chosen["sd_model_checkpoint"])
        chosen["sd_checkpoint_hash"] = checkpoint.sha256 or checkpoint.shorthash
    state.options.update(chosen)


@router.post("/options")
def set_options(request: Request, body: Options) -> None:
    """Update settings; a checkpoint switch loads the model when the next job runs (unknown names: 422)."""
    update_options(request.app.state, body)


@router.post("/refresh-checkpoints")
def refresh_checkpoints(request: Request) -> None:
    """Rescan --models-dir."""
    request.app.state.library.refresh()


@router.post("/unload-checkpoint")
@router.post("/reload-checkpoint")
def unload_or_reload() -> dict:
    """The web UI moves the model between GPU and CPU memory; this server keeps it in CPU memory, so both are
    no-ops (a checkpoint switch frees the previous model)."""
    return {}


def lora_files(pipeline: Any) -> list[Path]:
    """LoRA files in the server's LoRA folder (what `<lora:NAME:W>` prompt tags resolve to)."""
    folder = getattr(pipeline, "lora_dir", None)
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.suffix in SUFFIXES and p.is_file())


def lora_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's safetensors header metadata; {} for .pt / .ckpt files and unreadable ones."""
    if path.suffix != ".safetensors":
        return {}
    try:
        return read_metadata(path)
    except NanoDiffusionError:
        return {}


@router.get("/loras")
def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA folder's files, as the popular web UI lists them (use them with <lora:NAME:WEIGHT>); paths are
    relative to the LoRA folder."""
    pipeline = request.app.state.pipeline
    return [{"name": p.stem, "alias": p.stem, "path": p.relative_to(pipeline.lora_dir).as_posix(),
             "metadata": lora_metadata(p)} for p in lora_files(pipeline)]
