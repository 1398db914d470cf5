"""Reading generation parameters back from an image: the "parameters" PNG text (or JPEG / WebP EXIF comment)
parsed the way the popular web UI does (modules/infotext_utils.py `parse_generation_parameters` 1.10)."""

from __future__ import annotations

import json
import re
from typing import Any

from PIL import Image

PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
EXIF_USER_COMMENT, EXIF_IFD = 0x9286, 0x8769
# what the web UI leaves out of png-info's `items` (modules/images.py IGNORED_INFO_KEYS)
IGNORED_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop"}
# fields the web UI fills in when the text lacks them (what their absence means)
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "",
    "Hires negative prompt": "", "Mask mode": "Inpaint masked", "Masked content": "original",
    "Inpaint area": "Whole picture", "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic",
    "Schedule max sigma": 0, "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full",
    "VAE Decoder": "Full", "FP8 weight": "Disable", "Refiner switch by sampling steps": False,
}


def unquote(text: str) -> str:
    """A JSON-quoted value's text; anything else unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_generation_parameters(text: str) -> dict[str, Any]:
    """Prompt, negative prompt and every "Key: value" of the last line (quoted values unquoted, "Size: WxH" as
    Size-1 / Size-2), with the web UI's defaults for fields the text lacks."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {}
    for key, value in PARAM.findall(last):
        value = unquote(value)
        size = IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    result["Prompt"], result["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    return {**DEFAULTS, **result}


def exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment the web UI writes into JPEG / WebP files ("UNICODE\\0" + UTF-16), if any."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return raw if isinstance(raw, str) else None
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        order = "utf-16-be" if body[:1] == b"\0" else "utf-16-le"
        return body.decode(order, "replace")
    return body.decode("utf-8", "replace")


def read_image_info(image: Image.Image) -> tuple[str, dict[str, str]]:
    """(the parameters text, the image's other text items), as the web UI's png-info reports them."""
    items = {key: value for key, value in image.info.items()
             if isinstance(key, str) and isinstance(value, str) and key not in IGNORED_KEYS}
    text = items.pop("parameters", None) or exif_comment(image) or ""
    return text, items
