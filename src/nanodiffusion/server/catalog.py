"""What the server has, in the web UI's list shapes: samplers, schedulers, upscalers, styles, scripts, flags, memory.

Lists of things this project has none of (face restorers, hypernetworks, embeddings, VAEs, Real-ESRGAN models)
are empty, truthfully; clients iterate them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from fastapi import APIRouter, Request

from ..sampler_names import WEB_SAMPLERS, WEB_SCHEDULERS
from .jobs import HIRES_UPSCALERS
from .upscale import UPSCALERS
from .xyz_script import SCRIPT_NAME, script_info as xyz_script_info

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    """The samplers this server runs, by the web UI's names, with its aliases and our id."""
    return [{"name": s.name, "aliases": sorted({*s.aliases, s.ours}),
             "options": {"scheduler": s.automatic} if s.automatic != "uniform" else {}}
            for s in WEB_SAMPLERS if s.ours is not None]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """The web UI's schedulers that run here (others fall back to Automatic, with a warning in `info`)."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
             "need_inner_model": s.need_inner_model} for s in WEB_SCHEDULERS if s.name == "automatic" or s.ours]


@router.get("/upscalers")
def upscalers() -> list[dict[str, Any]]:
    """The Pillow resamplers /extra-single-image uses ("None" keeps the size)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": scale}
            for name, (_, scale) in UPSCALERS.items()]


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, str]]:
    """The hires fix's latent upscalers (hr_upscaler takes these and "Lanczos")."""
    return [{"name": name} for name in HIRES_UPSCALERS if name and name.startswith("Latent")]


@router.get("/face-restorers")
@router.get("/realesrgan-models")
@router.get("/hypernetworks")
@router.get("/sd-vae")
def nothing() -> list:
    """Things this server has none of."""
    return []


@router.get("/embeddings")
def embeddings() -> dict[str, dict]:
    """Textual-inversion embeddings: none are loaded by this server."""
    return {"loaded": {}, "skipped": {}}


@router.get("/prompt-styles")
def prompt_styles(request: Request) -> list[dict[str, str]]:
    """The styles of --styles-file (apply them with the request's `styles` list)."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in request.app.state.styles.values()]


def script_names(request: Request) -> list[str]:
    """Always-on scripts: the ControlNet extension's units, when a ControlNet is loaded."""
    return ["controlnet"] if getattr(request.app.state.pipeline, "controlnet", None) is not None else []


@router.get("/scripts")
def scripts(request: Request) -> dict[str, list[str]]:
    """Scripts by mode, as the web UI lists them: the X/Y/Z plot (script_name) and the always-on ones."""
    names = [SCRIPT_NAME, *script_names(request)]
    return {"txt2img": names, "img2img": names}


@router.get("/script-info")
def script_info(request: Request) -> list[dict[str, Any]]:
    """Each script's description: the X/Y/Z plot's script_args (xyz_script.py); the always-on ControlNet's args are
    unit dicts (see jobs.controlnet_unit)."""
    return [xyz_script_info(is_img2img) for is_img2img in (False, True)] + [
        {"name": name, "is_alwayson": True, "is_img2img": is_img2img, "args": []}
        for name in script_names(request) for is_img2img in (False, True)]


@router.get("/cmd-flags")
def cmd_flags(request: Request) -> dict[str, Any]:
    """How the server was started, under the web UI's flag names (credentials never shown)."""
    return request.app.state.flags


@router.get("/memory")
def memory() -> dict[str, dict]:
    """RAM of this process and CUDA memory, as the web UI reports them."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        used = process.memory_info().rss
        total = psutil.virtual_memory().total
        ram = {"free": total - used, "used": used, "total": total}
    except (ImportError, OSError) as error:
        ram = {"error": str(error)}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    pair = {name: {"current": stats.get(f"{name}_bytes.all.current", 0), "peak": stats.get(f"{name}_bytes.all.peak", 0)}
            for name in ("allocated", "reserved", "active")}
    cuda = {"system": {"free": free, "used": total - free, "total": total}, **pair,
            "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                         "peak": stats.get("inactive_split_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}


@router.post("/refresh-vae")
@router.post("/refresh-embeddings")
@router.post("/refresh-loras")
def refresh_nothing() -> None:
    """Nothing to rescan: there are no VAE or embedding files, and the LoRA folder is read at every request."""
