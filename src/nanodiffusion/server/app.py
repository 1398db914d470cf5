"""The server: one loaded model, one worker thread, the /sdapi/v1 API, the web page; `nanodiff serve`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from . import api, web
from .guard import LOOPBACK_HOSTS, Guard, parse_auth
from .queue import Worker


def create_app(pipeline: Any, *, outputs: str | Path = "outputs", limits: api.Limits | None = None,
               max_queue: int = 8, max_body: int = 32 << 20, auth: str | None = None,
               allowed_hosts: set[str] | None = None) -> FastAPI:
    """Build the ASGI app around a loaded pipeline (anything with Pipeline's call signature and decode)."""
    credentials = parse_auth(auth)
    outputs = Path(outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="nanodiffusion", version="0.1.0", docs_url=None,
                  description="Stable Diffusion web UI and the /sdapi/v1 API of the popular web UI.")
    app.state.pipeline = pipeline
    app.state.limits = limits or api.Limits()
    app.state.options = api.default_options(pipeline)
    app.state.worker = Worker(pipeline, outputs, max_queue=max_queue)
    app.include_router(api.router)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC), name="static")
    app.mount("/outputs", StaticFiles(directory=outputs), name="outputs")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI served from the installed swagger-ui-bundle package (offline, no CDN)."""
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="nanodiffusion API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    app.add_middleware(Guard, credentials=credentials, max_body=max_body, allowed_hosts=allowed_hosts)
    return app


def serve(args: argparse.Namespace) -> None:
    """`nanodiff serve`: load the model once and serve it (loopback unless --listen)."""
    import uvicorn

    from ..pipeline import Pipeline

    host = "0.0.0.0" if args.listen else args.host
    parse_auth(args.api_auth)  # fail on a malformed USER:PASS before the model loads
    pipeline = Pipeline.load(args.model)
    pipeline.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if args.controlnet:
        from ..controlnet_files import load_controlnet

        pipeline.controlnet = load_controlnet(Path(args.controlnet))
    app = create_app(pipeline, outputs=args.outputs, auth=args.api_auth,
                     allowed_hosts=LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None)
    print(f"nanodiffusion: {pipeline.name} on http://{'127.0.0.1' if host == '0.0.0.0' else host}:{args.port} "
          f"(API docs at /docs, images saved to {Path(args.outputs).resolve()})")
    uvicorn.run(app, host=host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
