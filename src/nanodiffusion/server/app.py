"""The server: one loaded model, one worker thread, the /sdapi/v1 API, the web page; `nanodiff serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..styles import load_styles
from . import api, catalog, extras, internal, learn, stream, web
from .errors import http_error, server_error, validation_error
from .guard import Guard, allowed_hosts_for, is_loopback, parse_auth
from .model_library import ModelLibrary
from .queue import Worker
from .schema import Limits


def create_app(pipeline: Any, *, outputs: str | Path = "outputs", limits: Limits | None = None,
               max_queue: int = 8, max_body: int = 32 << 20, auth: str | None = None, ui_auth: str | None = None,
               allowed_hosts: set[str] | None = None, body_timeout: float = 10.0,
               cors_allow_origins: list[str] | None = None, cors_allow_origins_regex: str | None = None,
               model_path: str | Path | None = None, models_dir: str | Path | None = None,
               loader: Callable[[Path], Any] | None = None, styles_file: str | Path | None = None,
               controlnet_name: str | None = None, flags: dict[str, Any] | None = None) -> FastAPI:
    """Build the ASGI app around a loaded pipeline (anything with Pipeline's call signature and decode).
    auth: USER:PASS for the API, ui_auth: for the web page; allowed_hosts: Host names answered besides loopback
    (None: any); body_timeout: seconds a body may stall; cors_*: origins whose browsers may call (off: none);
    model_path / models_dir / loader: the started model's file, a folder of checkpoints to switch to, and how to
    load one (Pipeline.load); styles_file: a web UI styles.csv; flags: what /cmd-flags reports."""
    credentials, ui_credentials = parse_auth(auth), parse_auth(ui_auth, "--gradio-auth")
    outputs = Path(outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="nanodiffusion", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Stable Diffusion web UI and the /sdapi/v1 API of the popular web UI.")
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.state.pipeline = pipeline
    app.state.outputs = outputs
    app.state.limits = limits or Limits()
    app.state.options = api.default_options(pipeline)
    app.state.styles = load_styles(styles_file)
    app.state.controlnet_name = controlnet_name
    app.state.library = ModelLibrary(pipeline, model_path, models_dir, loader,
                                     on_load=lambda loaded: setattr(app.state, "pipeline", loaded))
    app.state.flags = flags or {"api": True, "nowebui": False, "ckpt_dir": str(models_dir) if models_dir else None,
                                "styles_file": [str(styles_file)] if styles_file else [],
                                "cors_allow_origins": ",".join(cors_allow_origins or []) or None,
                                "cors_allow_origins_regex": cors_allow_origins_regex}
    app.state.worker = Worker(pipeline, outputs, max_queue=max_queue, library=app.state.library)
    for module in (api, catalog, extras, internal, web, learn, stream):   # learn: the Learn tab, stream: Live
        app.include_router(module.router)
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

    app.add_middleware(Guard, credentials=credentials, ui_credentials=ui_credentials, max_body=max_body,
                       allowed_hosts=allowed_hosts, body_timeout=body_timeout, cors_origins=cors_allow_origins,
                       cors_regex=cors_allow_origins_regex)
    if cors_allow_origins or cors_allow_origins_regex:   # outermost: answers preflights, marks every response
        app.add_middleware(CORSMiddleware, allow_origins=cors_allow_origins or [],
                           allow_origin_regex=cors_allow_origins_regex, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=True)
    return app


def origins(value: str | list[str] | None) -> list[str] | None:
    """--cors-allow-origins "a,b" (as the web UI takes it) or a list -> a list; nothing -> None."""
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",")]
    return [item for item in value or [] if item] or None


def serve(args: argparse.Namespace) -> None:
    """`nanodiff serve`: load the model once and serve it (loopback unless --listen)."""
    import uvicorn

    from ..loading import BUILTIN
    from ..pipeline import Pipeline

    host = "0.0.0.0" if args.listen else args.host
    ui_auth = getattr(args, "gradio_auth", None)
    parse_auth(args.api_auth)  # fail on a malformed USER:PASS before the model loads
    parse_auth(ui_auth, "--gradio-auth")
    precision = getattr(args, "precision", None)
    pipeline = Pipeline.load(args.model, precision=precision)
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    pipeline.lora_dir = lora_dir
    if args.controlnet:
        from ..controlnet_files import load_controlnet

        pipeline.controlnet = load_controlnet(Path(args.controlnet))

    def load(path: Path) -> Any:
        loaded = Pipeline.load(path, precision=precision)
        loaded.lora_dir, loaded.controlnet = lora_dir, pipeline.controlnet
        return loaded

    cors, cors_regex = origins(getattr(args, "cors_allow_origins", None)), getattr(args, "cors_allow_origins_regex", None)
    models_dir, styles_file = getattr(args, "models_dir", None), getattr(args, "styles_file", None)
    flags = {"api": True, "nowebui": False, "listen": bool(args.listen), "port": args.port, "ckpt": args.model,
             "ckpt_dir": models_dir, "lora_dir": args.lora_dir, "styles_file": [styles_file] if styles_file else [],
             "cors_allow_origins": ",".join(cors or []) or None, "cors_allow_origins_regex": cors_regex,
             "precision": precision}
    app = create_app(pipeline, outputs=args.outputs, auth=args.api_auth, ui_auth=ui_auth,
                     allowed_hosts=allowed_hosts_for(host), cors_allow_origins=cors, cors_allow_origins_regex=cors_regex,
                     model_path=args.model or BUILTIN, models_dir=models_dir, loader=load, styles_file=styles_file,
                     controlnet_name=Path(args.controlnet).stem if args.controlnet else None, flags=flags)
    print(f"nanodiffusion: {pipeline.name} on {url(host, args.port)} "
          f"(API docs at /docs, images saved to {Path(args.outputs).resolve()})")
    if not is_loopback(host):
        for flag, value, what in (("--api-auth", args.api_auth, "the API"), ("--gradio-auth", ui_auth, "the web page")):
            if not value:
                print(f"WARNING: serving {what} on {host} WITHOUT {flag}: anyone who can reach this machine on port "
                      f"{args.port} can generate images and fill the disk; set {flag} USER:PASS", file=sys.stderr)
    uvicorn.run(app, host=host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)


def url(host: str, port: int) -> str:
    """http://HOST:PORT, with IPv6 addresses in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
