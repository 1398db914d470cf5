"""Routes outside /sdapi/v1 that clients of the web UI call: its page's task progress (modules/progress.py) and
the ControlNet extension's model listing (sd-webui-controlnet scripts/api.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from .schema import ApiModel

router = APIRouter(tags=["sdapi"])

CONTROLNET_API_VERSION = 2   # the sd-webui-controlnet API version whose unit fields jobs.controlnet_unit reads


class TaskProgressRequest(ApiModel):
    """A task id (a request's force_task_id) and the last live preview the caller has."""

    id_task: str | None = Field(None, max_length=200)
    id_live_preview: int = -1
    live_preview: bool = True


@router.post("/internal/progress")
def task_progress(request: Request, body: TaskProgressRequest) -> dict[str, Any]:
    """Whether the task runs, waits or is done, its progress and a live preview newer than id_live_preview."""
    worker = request.app.state.worker
    job = worker.jobs.get(body.id_task or "")
    active = job is not None and job is worker.current
    queued = job is not None and job.status == "queued"
    completed = job is not None and job.done.is_set()
    answer = {"active": active, "queued": queued, "completed": completed, "progress": None, "eta": None,
              "live_preview": None, "id_live_preview": -1,
              "textinfo": "In queue..." if queued else None if active else "Waiting..."}
    if not active:
        return answer
    answer.update(progress=job.progress, eta=job.eta, id_live_preview=body.id_live_preview,
                  textinfo=f"Step {job.step}/{job.total}")
    if body.live_preview and job.preview and job.preview_version != body.id_live_preview:
        answer.update(live_preview="data:image/png;base64," + job.preview, id_live_preview=job.preview_version)
    return answer


@router.get("/controlnet/version")
def controlnet_version() -> dict[str, int]:
    """The ControlNet extension API version whose units this server reads."""
    return {"version": CONTROLNET_API_VERSION}


@router.get("/controlnet/model_list")
def controlnet_models(request: Request) -> dict[str, list[str]]:
    """The ControlNet loaded with --controlnet (one at a time), or none."""
    name = request.app.state.controlnet_name
    loaded = getattr(request.app.state.pipeline, "controlnet", None) is not None
    return {"model_list": [name or "controlnet"] if loaded else []}


@router.get("/controlnet/module_list")
def controlnet_modules() -> dict[str, list[str]]:
    """Preprocessors: none here, control images are used as sent."""
    return {"module_list": ["none"]}
