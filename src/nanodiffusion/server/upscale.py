"""Upscaling for the web UI's "Extras" endpoints: Pillow resampling, sized the way the web UI sizes it
(scripts/postprocessing_upscale.py: by a factor, or to cover a target size and optionally crop to it)."""

from __future__ import annotations

from PIL import Image

from ..errors import NanoDiffusionError, choice_error

# name -> (Pillow filter, the scale the web UI lists); "None" is no upscaler: the image keeps its size
UPSCALERS: dict[str, tuple[Image.Resampling | None, int]] = {
    "None": (None, 4), "Lanczos": (Image.Resampling.LANCZOS, 4), "Nearest": (Image.Resampling.NEAREST, 4)}
MAX_PIXELS = 4096 * 4096


def check_upscaler(name: str, field: str) -> None:
    """An upscaler name this server has, else an error listing them."""
    if name not in UPSCALERS:
        raise choice_error(field, name, list(UPSCALERS))


def target_size(image: Image.Image, mode: int, factor: float, width: int, height: int, crop: bool) -> tuple[int, int]:
    """Mode 0: the image times `factor`; mode 1: scaled to cover width x height (cropped to it when `crop`)."""
    if mode == 1:
        factor = max(width / image.width, height / image.height)
    size = (round(image.width * factor), round(image.height * factor))
    if size[0] * size[1] > MAX_PIXELS or min(size) < 1:
        raise NanoDiffusionError(f"upscaling to {size[0]}x{size[1]} is not allowed: the result must have 1 to "
                                 f"{MAX_PIXELS} pixels")
    return size


def upscale(image: Image.Image, name: str, size: tuple[int, int]) -> Image.Image:
    """The image resampled to `size` with the named upscaler ("None": unchanged)."""
    method, _ = UPSCALERS[name]
    return image if method is None else image.convert("RGB").resize(size, method)


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The centre width x height of an image at least that large (the web UI's "crop to fit")."""
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
