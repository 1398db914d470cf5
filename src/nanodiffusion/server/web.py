"""The web page's own routes: config, submit a job, a server-sent event stream of its progress, cancel.

The page submits the same request body as /sdapi/v1/img2img (no init image -> txt2img), then listens on
`/api/jobs/{id}/events`: one JSON event per change (queue position, step, a preview of the x0 estimate
at every step, and at the end the saved images with their parameters).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse

from .api import lora_files, model_title, submit
from .queue import Job
from .schema import Img2ImgRequest

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 0.04
HEARTBEAT_SECONDS = 15.0

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
            "loras": [p.stem for p in lora_files(pipe)]}


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


def snapshot(job: Job, position: int, preview: bool) -> dict[str, Any]:
    """One event: the job's state; the preview only when it changed; the images once finished."""
    event = {"status": job.status, "position": position, "step": job.step, "total": job.total,
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
                event = snapshot(job, worker.position(job), job.preview_version != preview_version)
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
