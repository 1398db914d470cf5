"""Images over HTTP: base64 PNG out (with the parameters text chunk), base64 or data-URL images in."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..errors import NanoDiffusionError

MAX_IMAGE_PIXELS = 4096 * 4096


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG, keeping its "parameters" text so downloads carry their settings."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_to_b64(image: Image.Image) -> str:
    """PNG as a bare base64 string, the way the /sdapi/v1 API returns images."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def b64_to_image(text: str, field: str) -> Image.Image:
    """Decode a base64 image, with or without a "data:image/...;base64," prefix."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text)))
    except (binascii.Error, UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        raise NanoDiffusionError(f"{field} is not a base64-encoded image (PNG, JPEG or WebP)") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise NanoDiffusionError(f"{field} is {image.width}x{image.height}: too large, "
                                 f"send at most {MAX_IMAGE_PIXELS} pixels")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise NanoDiffusionError(f"{field} is a truncated or corrupt image") from None
    return image
