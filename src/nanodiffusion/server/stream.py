"""The Live tab's endpoint: POST a frame (PNG / JPEG body), get the diffused frame back (stream.py's engine).

One engine per server, shared by its callers under a lock; a change of prompt, strength, steps or cfg resets it
(the prompt embeddings are encoded once per prompt). The page sends its next frame when the last one is back,
so the frame rate it shows is the server's real rate, and X-Stream-Ms says how long the server worked on it.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ..errors import NanoDiffusionError
from ..stream import StreamDiffusion, StreamSettings, load_tiny_vae

router = APIRouter()


class LiveStream:
    """The server's stream engine, made on the first frame, reset when the page changes a setting."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline, self.lock, self.engine = pipeline, threading.Lock(), None

    def process(self, image: Image.Image, settings: StreamSettings) -> Image.Image:
        """Diffuse one frame with these settings."""
        with self.lock:
            if self.engine is None:
                tiny = load_tiny_vae(self.pipeline, "auto")
                self.engine = StreamDiffusion(self.pipeline, replace(settings, tiny_vae=tiny is not None), tiny)
            elif replace(settings, tiny_vae=self.engine.settings.tiny_vae) != self.engine.settings:
                self.engine.reset(replace(settings, tiny_vae=self.engine.settings.tiny_vae))
            return self.engine(image)


def live_stream(request: Request) -> LiveStream:
    """The app's LiveStream, made on first use."""
    state = request.app.state
    if getattr(state, "live_stream", None) is None:
        state.live_stream = LiveStream(state.pipeline)
    return state.live_stream


@router.post("/api/stream/frame", tags=["web"], response_class=Response)
async def stream_frame(request: Request, prompt: str = "", negative: str = "", strength: float = 0.5,
                       steps: int = 2, cfg: float = 1.5) -> Response:
    """Body: one image. Answer: the diffused frame as PNG; X-Stream-Ms: the server's time on it."""
    body = await request.body()
    try:
        with Image.open(io.BytesIO(body)) as image:
            frame = image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError):
        raise HTTPException(400, "the body is not a readable image: send one PNG or JPEG frame") from None
    settings = StreamSettings(prompt=prompt, negative=negative, strength=strength, steps=steps, cfg=cfg)
    start = time.perf_counter()
    try:
        out = await run_in_threadpool(live_stream(request).process, frame, settings)
    except NanoDiffusionError as error:
        raise HTTPException(400, str(error)) from None
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png",
                    headers={"X-Stream-Ms": f"{(time.perf_counter() - start) * 1000:.1f}", "Cache-Control": "no-store"})
