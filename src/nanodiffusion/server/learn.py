"""The Learn tab's routes: run the loaded pipeline once and show what every denoising step computed (x_t, the
x0 estimate, the noise estimate, per-token cross-attention), and comparison strips over CFG scales and samplers.

It runs the real pipeline: `Pipeline.__call__(step_callback=...)` hands over (step, sigma, x entering the step,
its guided x0 estimate), and forward hooks (models/attention_maps.py) read the cross-attention probabilities.
Each run is a job of the server's worker, queued with every other generation: the hooks on the shared UNet never
see another request's steps, and another request's LoRAs never touch a Learn run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np
import torch
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, Field

from ..images import to_pil
from ..learn.builtin import token_labels
from ..models.attention_maps import AttentionMaps
from .encoding import image_to_b64
from .queue import Job, QueueFull

DOCS = Path(__file__).resolve().parents[3] / "docs" / "learn"
CFG_SCALES = (1.0, 2.0, 4.0, 7.0, 12.0)
STRIP_SAMPLERS = ("Euler", "Euler a", "Heun", "DPM++ 2M", "DDIM", "UniPC")
WAIT_SECONDS = 0.05   # how often a waiting Learn request checks its job

router = APIRouter()


class LearnRequest(BaseModel):
    """What to denoise: the page's prompt, seed, steps (at most 50), CFG scale and sampler."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=50)
    seed: int = Field(0, ge=0)
    cfg_scale: float | None = Field(None, ge=0, le=30)
    sampler_name: str = "Euler"


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + image_to_b64(image)


def latent_picture(latent: torch.Tensor) -> Image.Image:
    """A latent's first three channels as RGB (unit variance -> about [-1, 1])."""
    return to_pil(latent[None, :3].float() / 2)[0]


def heatmap(values: torch.Tensor) -> Image.Image:
    """A map scaled to [0, 1], coloured black -> red -> yellow -> white."""
    v = (values - values.min()) / (values.max() - values.min()).clamp(min=1e-8)
    rgb = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], -1)
    return Image.fromarray((rgb.numpy() * 255).astype(np.uint8))


def generate(pipe: Any, body: LearnRequest, **overrides) -> Image.Image:
    """One image of the pipeline for the request (overrides: cfg, sampler, step_callback); bad settings raise
    NanoDiffusionError, which the worker answers as a 400."""
    options = {"steps": body.steps, "sampler": body.sampler_name, "seed": body.seed, "cfg": body.cfg_scale,
               **overrides}
    return pipe(body.prompt, body.negative_prompt, **options)[0]


async def on_worker(request: Request, work: Callable[[Any], Any]) -> Any:
    """work(pipeline), run as a job of the server's worker (queued with the other generations); a full queue is a
    429, a failure its status and message."""
    result: dict[str, Any] = {}

    def run(pipeline: Any, **_: Any) -> list[Image.Image]:
        result["value"] = work(pipeline)
        return []

    job = Job({"seed": 0}, run=run, previews=False)
    try:
        request.app.state.worker.submit(job)
    except QueueFull as error:
        raise HTTPException(429, str(error)) from None
    while not job.done.is_set():
        await anyio.sleep(WAIT_SECONDS)
    if job.status == "failed":
        raise HTTPException(job.error_status, job.error)
    return result["value"]


@router.post("/api/learn/steps", tags=["learn"])
async def denoising_steps(request: Request, body: LearnRequest) -> dict[str, Any]:
    """Generate once, returning every step: sigma, x_t, x0 estimate, noise estimate, per-token attention maps."""
    return await on_worker(request, lambda pipe: record_steps(pipe, body))


def record_steps(pipe: Any, body: LearnRequest) -> dict[str, Any]:
    """The steps route's work: one generation with the step callback and the attention recorder."""
    tokens = token_labels(pipe.tokenizer, body.prompt)
    steps: list[dict[str, Any]] = []
    with AttentionMaps(pipe.unet) as recorder:
        def on_step(i: int, sigma: float, x: torch.Tensor, x0: torch.Tensor) -> None:
            maps = recorder.token_maps(*x.shape[-2:], slice(-1, None))[0] if recorder.calls else None
            recorder.clear()
            steps.append({
                "step": i + 1, "sigma": sigma,
                "x_t": data_url(pipe.preview(x[:1] / math.sqrt(1 + sigma**2))[0]),
                "x0": data_url(pipe.preview(x0[:1])[0]),
                "eps": data_url(latent_picture((x[0] - x0[0]) / max(sigma, 1e-8))),
                "attention": [data_url(heatmap(maps[position])) if maps is not None else None
                              for position, _ in tokens],
            })

        image = generate(pipe, body, step_callback=on_step)
    return {"image": data_url(image), "tokens": [text for _, text in tokens], "steps": steps,
            "sigmas": [step["sigma"] for step in steps]}


@router.post("/api/learn/strip/{kind}", tags=["learn"])
async def comparison_strip(request: Request, kind: str, body: LearnRequest) -> dict[str, Any]:
    """The same prompt and seed at several CFG scales (`cfg`) or with several samplers (`sampler`)."""
    if kind == "cfg":
        runs = [(f"CFG {scale:g}", {"cfg": scale}) for scale in CFG_SCALES]
    elif kind == "sampler":
        runs = [(name, {"sampler": name}) for name in STRIP_SAMPLERS]
    else:
        raise HTTPException(404, f"no strip {kind!r}: use cfg or sampler")
    return await on_worker(request, lambda pipe: {
        "kind": kind, "images": [{"label": label, "image": data_url(generate(pipe, body, **options))}
                                 for label, options in runs]})


@router.get("/learn/docs/{name}", include_in_schema=False)
def lesson_file(name: str) -> FileResponse:
    """A lesson page or picture of docs/learn (when running from a checkout)."""
    path = DOCS / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise HTTPException(404, f"no lesson file {name}")
    return FileResponse(path, media_type="text/plain; charset=utf-8" if path.suffix == ".md" else None)
