"""Inpainting the masked area only (the popular web UI's "Only masked"): the box around the mask, padded and widened
to the output's aspect ratio, is cut out, scaled up to the generation size and inpainted there, then scaled back and
pasted into the image through the mask, so a small hole gets the model's full resolution."""

from __future__ import annotations

from PIL import Image


def masked_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): the mask's bounding box, `padding` pixels wider on each side, grown to the
    width : height aspect ratio around its centre, inside the image (the whole image when the mask is empty)."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return 0, 0, *mask.size
    left, top = max(box[0] - padding, 0), max(box[1] - padding, 0)
    right, bottom = min(box[2] + padding, mask.width), min(box[3] + padding, mask.height)
    w, h = right - left, bottom - top
    if w / h < width / height:
        w = min(round(h * width / height), mask.width)
    else:
        h = min(round(w * height / width), mask.height)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(cx - w / 2, 0), mask.width - w))
    top = int(min(max(cy - h / 2, 0), mask.height - h))
    return left, top, left + w, top + h


def paste_masked(base: Image.Image, inpainted: Image.Image, mask: Image.Image,
                 box: tuple[int, int, int, int]) -> Image.Image:
    """`base` with `inpainted` (generated for the box, at any size) scaled into the box where the mask is white."""
    out = base.convert("RGB").copy()
    size = (box[2] - box[0], box[3] - box[1])
    out.paste(inpainted.convert("RGB").resize(size, Image.LANCZOS), box[:2], mask.convert("L").crop(box))
    out.info = dict(inpainted.info)
    return out
