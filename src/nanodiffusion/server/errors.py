"""What a client may see of an error: one line, no absolute server paths, JSON-encodable text, in the web UI's
shape {"error": kind, "detail": message, "body": "", "errors": "STATUS: message"} (modules/api/api.py
`handle_exception`; the request body is never echoed back)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ABSOLUTE_PATH = re.compile(r"(?:[A-Za-z]:\\|/)(?:[^\s'\"/\\:,;()]+[/\\])+([^\s'\"/\\:,;()]*)")


def public_message(message: str, folders: Iterable[tuple[str | Path | None, str]] = ()) -> str:
    """The message with known folders named by role ("the LoRA folder") and any other absolute path cut to its
    file name; one line, unpaired surrogates escaped."""
    for folder, label in folders:
        if folder:
            message = message.replace(str(Path(folder).resolve()), label).replace(str(folder), label)
    message = ABSOLUTE_PATH.sub(lambda match: match.group(1) or "a server folder", message)
    return " ".join(message.split()).encode("utf-8", "backslashreplace").decode("utf-8")


def server_folders(pipeline: Any, outputs: Path | None) -> list[tuple[str | Path | None, str]]:
    """The server's folders and how messages name them."""
    return [(getattr(pipeline, "lora_dir", None), "the LoRA folder"), (outputs, "the outputs folder")]


def validation_message(error: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: "field.path: problem (got value)"."""
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        text = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        value = item.get("input")
        if isinstance(value, (int, float, bool)) and item.get("type") != "missing":
            text += f" (got {value!r})"
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts)


def error_body(kind: str, status: int, message: str) -> dict[str, str]:
    """The web UI's error body for a one-line message."""
    return {"error": kind, "detail": message, "body": "", "errors": f"{status}: {message}"}


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with a one-line detail, whatever the body held (never echoes it back)."""
    message = public_message(validation_message(error))
    return JSONResponse(error_body("RequestValidationError", 422, message), status_code=422)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Any HTTPException (ours, and FastAPI's 404 / 405) in the web UI's shape, its headers kept."""
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    return JSONResponse(error_body("HTTPException", error.status_code, message), status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def server_error(request: Request, error: Exception) -> JSONResponse:
    """A bug: 500 in the web UI's shape, naming the exception's type only (the log has the traceback)."""
    message = f"internal error ({type(error).__name__}): see the server log"
    return JSONResponse(error_body(type(error).__name__, 500, message), status_code=500)
