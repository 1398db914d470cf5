"""The server: one loaded model, one worker thread, the /sdapi/v1 API, the web page; `nanodiff serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from . import api, learn, stream, web
from .errors import validation_error
from .guard import Guard, allowed_hosts_for, is_loopback, parse_auth
from .queue import Worker
from .schema import Limits


def create_app(pipeline: Any, *, outputs: str | Path = "outputs", limits: Limits | None = None,
               max_queue: int = 8, max_body: int = 32 << 20, auth: str | None = None,
               allowed_hosts: set[str] | None = None, body_timeout: float = 10.0) -> FastAPI:
    """Build the ASGI app around a loaded pipeline (anything with Pipeline's call signature and decode).
    allowed_hosts: Host names answered besides loopback (None: any); body_timeout: seconds a body may stall."""
    credentials = parse_auth(auth)
    outputs = Path(outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="nanodiffusion", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Stable Diffusion web UI and the /sdapi/v1 API of the popular web UI.")
    app.add_exception_handler(RequestValidationError, validation_error)
    app.state.pipeline = pipeline
    app.state.outputs = outputs
    app.state.limits = limits or Limits()
    app.state.options = api.default_options(pipeline)
    app.state.worker = Worker(pipeline, outputs, max_queue=max_queue)
    app.include_router(api.router)
    app.include_router(web.router)
    app.include_router(learn.router)   # the Learn tab (server/learn.py)
    app.include_router(stream.router)  # the Live tab (server/stream.py)
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

    app.add_middleware(Guard, credentials=credentials, max_body=max_body, allowed_hosts=allowed_hosts,
                       body_timeout=body_timeout)
    return app


def serve(args: argparse.Namespace) -> None:
    """`nanodiff serve`: load the model once and serve it (loopback unless --listen)."""
    import uvicorn

    from ..pipeline import Pipeline

    host = "0.0.0.0" if args.listen else args.host
    parse_auth(args.api_auth)  # fail on a malformed USER:PASS before the model loads
    pipeline = Pipeline.load(args.model, precision=getattr(args, "precision", None))
    pipeline.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if args.controlnet:
        from ..controlnet_files import load_controlnet

        pipeline.controlnet = load_controlnet(Path(args.controlnet))
    app = create_app(pipeline, outputs=args.outputs, auth=args.api_auth, allowed_hosts=allowed_hosts_for(host))
    print(f"nanodiffusion: {pipeline.name} on {url(host, args.port)} "
          f"(API docs at /docs, images saved to {Path(args.outputs).resolve()})")
    if not is_loopback(host) and not args.api_auth:
        print(f"WARNING: serving on {host} WITHOUT --api-auth: anyone who can reach this machine on port {args.port} "
              "can generate images and fill the disk; set --api-auth USER:PASS", file=sys.stderr)
    uvicorn.run(app, host=host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)


def url(host: str, port: int) -> str:
    """http://HOST:PORT, with IPv6 addresses in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
