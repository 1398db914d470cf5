"""The web page's own routes: config, submit a job or an X/Y/Z plot, a server-sent event stream of its progress,
cancel, and the history of saved outputs.

The page submits the same request body as /sdapi/v1/img2img (no init image -> txt2img), then listens on
`/api/jobs/{id}/events`: one JSON event per change (queue position and jobs ahead, step, a preview of the x0
estimate at every step, and at the end the saved images with their parameters).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from ..errors import NanoDiffusionError
from ..pipeline import Pipeline
from ..request import GenerationRequest
from ..xyz import Axis, fix_axis_seeds, parse_axis, plot_cells, xyz_cells
from .api import lora_files, model_title, submit
from .errors import public_message, server_folders
from .jobs import build_job
from .queue import Job, QueueFull, Worker
from .schema import Img2ImgRequest
from .xyz_script import MAX_PLOT_CELLS

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 0.04
HEARTBEAT_SECONDS = 15.0
PLOT_FIELDS = {"steps": "steps", "cfg": "cfg_scale", "sampler": "sampler_name", "schedule": "scheduler",
               "seed": "seed", "strength": "denoising_strength", "width": "width", "height": "height",
               "prompt_sr": "prompt_sr"}   # X/Y/Z axis (pipeline keyword) -> the request field it sets

router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The single-page web UI."""
    return FileResponse(STATIC / "index.html")


@router.get("/api/config", tags=["web"])
def config(request: Request) -> dict[str, Any]:
    """What the page needs to build its form: model, defaults, limits."""
    state = request.app.state
    pipe = state.pipeline
    return {"model": model_title(pipe), "default_size": pipe.default_size, "default_cfg": pipe.default_cfg,
            "limits": asdict(state.limits), "controlnet": getattr(pipe, "controlnet", None) is not None,
            "loras": [p.stem for p in lora_files(pipe)], "hires": "hires" in call_keywords(pipe),
            "xyz": True, "xyz_axes": list(PLOT_FIELDS)}


def call_keywords(pipe: Any) -> set[str]:
    """The keyword arguments the pipeline's call takes: a Pipeline's are a GenerationRequest's settings (it takes
    them as **settings); another callable's, its named parameters (empty if its signature cannot be read)."""
    if isinstance(pipe, Pipeline):
        return {f.name for f in fields(GenerationRequest)}
    try:
        return set(inspect.signature(pipe).parameters)
    except (TypeError, ValueError):
        return set()


@router.post("/api/jobs", tags=["web"])
async def create_job(request: Request, body: Img2ImgRequest) -> dict[str, Any]:
    """Queue a generation (results are saved under the outputs folder); returns its id and queue position."""
    job, position = await submit(request, body, save=True)
    return {"id": job.id, "position": position}


def find_job(request: Request, job_id: str) -> Job:
    """Look a job up by id, 404 if unknown or forgotten."""
    job = request.app.state.worker.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.post("/api/jobs/{job_id}/cancel", tags=["web"])
def cancel_job(request: Request, job_id: str) -> dict[str, str]:
    """Drop the job if it waits, stop it at the next step if it runs."""
    job = find_job(request, job_id)
    request.app.state.worker.cancel(job)
    return {"status": job.status}


def jobs_ahead(worker: Worker, job: Job) -> tuple[int, int]:
    """(queue position, jobs to finish before this one starts: those waiting in front and the running one)."""
    position, current = worker.position(job), worker.current
    return position, (position - 1 + (current is not None and current is not job)) if position else 0


def snapshot(job: Job, position: tuple[int, int], preview: bool) -> dict[str, Any]:
    """One event: the job's state; the preview only when it changed; the images once finished."""
    event = {"status": job.status, "position": position[0], "ahead": position[1], "step": job.step, "total": job.total,
             "iteration": job.iteration, "n_iter": job.n_iter, "progress": job.progress, "error": job.error}
    if preview and job.preview:
        event["preview"] = "data:image/png;base64," + job.preview
    if job.done.is_set():
        event["images"] = [{"url": f"/outputs/{path}", "name": path.rpartition("/")[2],
                            "parameters": image.info.get("parameters", "")}
                           for path, image in zip(job.saved, job.images)]
    return event


@router.get("/api/jobs/{job_id}/events", tags=["web"])
def job_events(request: Request, job_id: str) -> StreamingResponse:
    """Server-sent events: the job's state after every change, until it finishes."""
    job = find_job(request, job_id)
    worker = request.app.state.worker

    async def stream() -> AsyncIterator[str]:
        version = preview_version = -1
        quiet = 0.0
        while True:
            if job.version != version:
                version, finished = job.version, job.done.is_set()
                event = snapshot(job, jobs_ahead(worker, job), job.preview_version != preview_version)
                preview_version = job.preview_version
                yield f"data: {json.dumps(event)}\n\n"
                if finished:
                    return
                quiet = 0.0
            elif quiet >= HEARTBEAT_SECONDS:
                yield ": keep-alive\n\n"
                quiet = 0.0
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class PlotAxis(BaseModel):
    """One X/Y/Z axis: a pipeline keyword (see PLOT_FIELDS) and its values in the web UI's syntax ("1-5", "a, b")."""

    name: str
    values: str = Field(max_length=10_000)


class PlotRequest(Img2ImgRequest):
    """A generation request plus one to three axes; stack puts the Z grids one above the other."""

    axes: list[PlotAxis] = Field(min_length=1, max_length=3)
    stack: bool = False


def plot_job(body: PlotRequest, state: Any) -> Job:
    """Every cell checked as its own request (limits, names, images), as one job that draws the grid."""
    axes = fix_axis_seeds([(axis.name, parse_axis(axis.name, axis.values)) for axis in body.axes])
    unknown = [name for name, _ in axes if name not in PLOT_FIELDS]
    if unknown:
        raise NanoDiffusionError(f"X/Y/Z axis {unknown[0]!r} is not offered here; choose one of: {', '.join(PLOT_FIELDS)}")
    count = math.prod(len(values) for _, values in axes)
    if count > MAX_PLOT_CELLS:
        raise NanoDiffusionError(f"the X/Y/Z plot has {count} cells: use at most {MAX_PLOT_CELLS}")
    base = {**body.model_dump(exclude={"axes", "stack"}), "batch_size": 1, "n_iter": 1}
    requests = xyz_cells(base, [(PLOT_FIELDS[name], values) for name, values in axes])
    jobs = [build_job(Img2ImgRequest.model_validate(cell), state.pipeline, state.options, state.limits, save=True,
                      styles=state.styles, library=state.library) for cell in requests]
    job = jobs[0]
    job.run = partial(run_plot, cells=[cell.kwargs for cell in jobs], axes=axes, stack=body.stack)
    return job


def run_plot(pipeline: Any, *, cells: list[dict[str, Any]], axes: list[Axis], stack: bool, callback: Any,
             **_: Any) -> list[Image.Image]:
    """What the worker runs for a plot job: every cell, then the grid (its only image)."""
    return [plot_cells(pipeline, cells, axes, callback=callback, stack=stack)]


@router.post("/api/xyz", tags=["web"])
async def create_plot(request: Request, body: PlotRequest) -> dict[str, Any]:
    """Queue an X/Y/Z plot as one job; its single image (the labelled grid) is saved under the outputs folder."""
    state = request.app.state
    if not state.worker.has_room():
        raise HTTPException(429, state.worker.full_message())
    try:
        job = await anyio.to_thread.run_sync(plot_job, body, state)
        return {"id": job.id, "position": state.worker.submit(job)}
    except NanoDiffusionError as error:
        raise HTTPException(422, public_message(str(error), server_folders(state.pipeline, state.outputs))) from None
    except QueueFull as error:
        raise HTTPException(429, str(error)) from None


def saved_pngs(outputs: Path) -> list[tuple[Path, float]]:
    """PNGs under the outputs folder (never outside it, links included), newest first."""
    root = outputs.resolve()
    found = []
    for path in root.rglob("*.png"):
        if path.name.startswith(".") or not path.resolve().is_relative_to(root) or not path.is_file():
            continue
        try:
            found.append((path, path.stat().st_mtime))
        except OSError:   # deleted meanwhile
            continue
    return sorted(found, key=lambda item: (item[1], item[0].as_posix()), reverse=True)


def png_parameters(path: Path) -> str:
    """A saved PNG's "parameters" text ("" if it has none or cannot be read)."""
    try:
        with Image.open(path) as image:
            return str(image.info.get("parameters", ""))
    except (OSError, UnidentifiedImageError):
        return ""


@router.get("/api/outputs", tags=["web"])
def output_history(request: Request, page: int = Query(0, ge=0), per_page: int = Query(24, ge=1, le=100)
                   ) -> dict[str, Any]:
    """Saved images, newest first, a page at a time, each with its URL and parameters text."""
    root = request.app.state.outputs.resolve()
    files = saved_pngs(root)
    chosen = files[page * per_page:(page + 1) * per_page]
    items = [{"url": "/outputs/" + quote(path.relative_to(root).as_posix()), "name": path.name,
              "path": path.relative_to(root).as_posix(), "modified": modified, "parameters": png_parameters(path)}
             for path, modified in chosen]
    return {"items": items, "total": len(files), "page": page, "per_page": per_page,
            "pages": max(1, math.ceil(len(files) / per_page))}
