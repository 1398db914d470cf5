"""Images in and out: PIL <-> tensors in [-1, 1], PNGs with their parameters text, grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import NanoDiffusionError


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, with a clear error when it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise NanoDiffusionError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise NanoDiffusionError(f"{path} is not a readable image ({error})") from None


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image -> [1, 3, H, W] float tensor in [-1, 1], resized to size=(width, height) if given."""
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_to_tensor(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Mask image -> [1, 1, H, W] in {0, 1}; white (>= 0.5) marks the region to repaint."""
    gray = mask.convert("L").resize(size, Image.Resampling.LANCZOS)
    array = (np.asarray(gray, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    return torch.from_numpy(array)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] tensor in [-1, 1] -> list of 8-bit RGB PIL images (round to nearest)."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in array.cpu()]


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images into a near-square grid."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG with its "parameters" text chunk, atomically (no half-written file on a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # per process: batch workers may share a folder
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
