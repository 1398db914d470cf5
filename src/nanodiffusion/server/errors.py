"""What a client may see of an error: one line, no absolute server paths, JSON-encodable text."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with a one-line detail, whatever the body held (never echoes it back)."""
    return JSONResponse({"detail": public_message(validation_message(error))}, status_code=422)
