"""The /sdapi/v1 request and response bodies, shaped like the popular web UI's (AUTOMATIC1111).

Requests carry many fields: those of the web UI this project cannot honour are refused when they ask for
something (fields.py); fields no version of the web UI has are accepted, ignored and echoed back. JSON allows what no field may hold: NaN / Infinity (Python's json reads
them) and text with unpaired surrogates ("\\ud800"). Both are refused anywhere in a body, extra fields
included, so they never reach the pipeline nor break the response's encoding. Ranges that do not depend on
the server's configuration are declared on the fields; the configurable ones are in `Limits` (jobs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..prompts import check_text


@dataclass
class Limits:
    """What one request may ask for; anything beyond gets a 422 naming the limit."""

    max_side: int = 1024
    max_steps: int = 150
    max_batch: int = 8
    max_n_iter: int = 16
    max_cfg: float = 30.0


def check_json_values(data: Any) -> Any:
    """Refuse a non-finite number or unencodable text anywhere in parsed JSON (keys too), naming where it is."""
    pending = [(data, "")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where or 'value'} is {value}: send a finite number")
        if isinstance(value, str):
            check_text(value, where or "text")
        elif isinstance(value, dict):
            for key, item in value.items():
                check_text(str(key), f"a key in {where or 'the body'}")
                pending.append((item, f"{where}.{key}" if where else str(key)))
        elif isinstance(value, (list, tuple)):
            pending.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return data


class ApiModel(BaseModel):
    """A request body: unknown fields allowed, no NaN / Infinity, no unpaired surrogates."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def finite_and_encodable(cls, data: Any) -> Any:
        return check_json_values(data)


class Options(ApiModel):
    """The settings this server applies; the fixed ones it reports are checked in api.py, others are ignored as
    the web UI ignores settings it does not know."""

    CLIP_stop_at_last_layers: int | None = Field(None, ge=1, le=12)
    live_previews_enable: bool | None = None
    show_progress_every_n_steps: int | None = Field(None, ge=1, le=1000)
    sd_model_checkpoint: str | None = None
    sd_vae: str | None = None


class Txt2ImgRequest(ApiModel):
    """A txt2img request; unknown fields are accepted and ignored."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = Field(0.0, ge=0, le=1)
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    tiling: bool | None = None
    enable_hr: bool = False
    hr_scale: float = Field(2.0, gt=0, le=8)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    refiner_checkpoint: str | None = None             # a checkpoint title / name that takes over the sampling
    refiner_switch_at: float | None = None            # ... at this fraction of the steps (the web UI's 0.8)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = Field(None, ge=0, le=10)
    denoising_strength: float | None = None
    override_settings: Options | None = None
    alwayson_scripts: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    force_task_id: str | None = Field(None, max_length=200)
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """An img2img / inpaint request: init image(s), optional mask (white = repaint), strength."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=64)   # given: both of mask_blur_x and mask_blur_y, as the web UI's
    mask_blur_x: int = Field(4, ge=0, le=64)            # Gaussian blur of the mask's edge across / down, in pixels
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool | int = False
    inpaint_full_res_padding: int = Field(32, ge=0, le=512)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    """The generation response: images, the request echoed back, and the info JSON string."""

    images: list[str] = Field(description="base64 PNG images, each with its parameters text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: prompt, all_prompts, seed, all_seeds, infotexts, ...")
