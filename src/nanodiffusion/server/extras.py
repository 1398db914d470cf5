"""The web UI's image utilities: "Extras" upscaling (one image or a batch), PNG info, interrogate (501).

Shapes follow modules/api/models.py (ExtrasSingleImageRequest, PNGInfoResponse, ...). Face restoration is not
available here: a non-zero GFPGAN / CodeFormer visibility is a 422 naming it.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, HTTPException
from PIL import Image
from pydantic import BaseModel, Field

from ..errors import NanoDiffusionError
from ..pnginfo import parse_generation_parameters, read_image_info
from .encoding import b64_to_image, image_to_b64
from .schema import ApiModel
from .upscale import center_crop, check_upscaler, target_size, upscale

router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])


class ExtrasRequest(ApiModel):
    """Upscaling settings shared by the single-image and batch requests."""

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=16)
    upscaling_resize_w: int = Field(512, ge=1, le=8192)
    upscaling_resize_h: int = Field(512, ge=1, le=8192)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    """One base64 image."""

    image: str = ""


class FileData(BaseModel):
    """A base64 image with its name."""

    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    """Several base64 images."""

    imageList: list[FileData] = Field(min_length=1, max_length=64)  # noqa: N815 - the web UI's field name


class PngInfoRequest(ApiModel):
    """A base64 image (PNG, or JPEG / WebP with an EXIF comment)."""

    image: str


def run_extras(image: Image.Image, request: ExtrasRequest) -> tuple[Image.Image, str]:
    """Upscale one image as asked -> (image, the web UI's html_info line)."""
    if request.gfpgan_visibility or request.codeformer_visibility:
        raise NanoDiffusionError("face restoration (gfpgan_visibility / codeformer_visibility) is not available "
                                 "on this server: send 0")
    check_upscaler(request.upscaler_1, "upscaler_1")
    check_upscaler(request.upscaler_2, "upscaler_2")
    if request.upscaler_1 == "None":
        return image, ""
    size = target_size(image, request.resize_mode, request.upscaling_resize, request.upscaling_resize_w,
                       request.upscaling_resize_h, request.upscaling_crop)
    result = upscale(image, request.upscaler_1, size)
    if request.upscaler_2 != "None" and request.extras_upscaler_2_visibility > 0:
        result = Image.blend(result, upscale(image, request.upscaler_2, size), request.extras_upscaler_2_visibility)
    if request.resize_mode == 1 and request.upscaling_crop:
        result = center_crop(result, request.upscaling_resize_w, request.upscaling_resize_h)
    info = f"Postprocess upscale to: {result.width}x{result.height}, Postprocess upscaler: {request.upscaler_1}"
    return result, f"<p>{info}</p>"


async def in_thread(function: Any, *args: Any) -> Any:
    """Run image work off the event loop; bad input -> 422."""
    try:
        return await anyio.to_thread.run_sync(function, *args)
    except NanoDiffusionError as error:
        raise HTTPException(422, str(error)) from None


@router.post("/extra-single-image")
async def extra_single_image(body: ExtrasSingleImageRequest) -> dict[str, Any]:
    """Upscale one image (Lanczos / Nearest; "None" returns it unchanged)."""

    def work() -> dict[str, Any]:
        image, html = run_extras(b64_to_image(body.image, "image"), body)
        return {"html_info": html, "image": image_to_b64(image) if body.show_extras_results else None}

    return await in_thread(work)


@router.post("/extra-batch-images")
async def extra_batch_images(body: ExtrasBatchImagesRequest) -> dict[str, Any]:
    """Upscale each image of imageList the same way."""

    def work() -> dict[str, Any]:
        results = [run_extras(b64_to_image(item.data, f"imageList[{i}]"), body)
                   for i, item in enumerate(body.imageList)]
        images = [image_to_b64(image) for image, _ in results] if body.show_extras_results else []
        return {"html_info": results[0][1], "images": images}

    return await in_thread(work)


@router.post("/png-info")
async def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The image's generation parameters: the raw text, its other text items, and the text parsed like the
    web UI's parse_generation_parameters."""

    def work() -> dict[str, Any]:
        text, items = read_image_info(b64_to_image(body.image.strip(), "image"))
        return {"info": text, "items": items, "parameters": parse_generation_parameters(text)}

    return await in_thread(work)


@router.post("/interrogate")
def interrogate() -> None:
    """Image captioning needs a CLIP interrogator or DeepDanbooru model, which this server does not have."""
    raise HTTPException(501, "interrogate is not available: this server has no CLIP interrogator or "
                             "DeepDanbooru model")
