"""A user's image folder with captions: the data for training or fine-tuning on their own images.

Images are .png / .jpg / .jpeg / .webp files anywhere under the folder. A caption comes from the
folder's `metadata.jsonl` ({"file_name": ..., "text": ...} per line, the Hugging Face imagefolder
convention), else from a `.txt` file beside the image (the kohya convention), else it is "".
A metadata line may also give the image's object boxes, "boxes": [[cx, cy, half side], ...] as fractions of
the (centre-cropped, square) image, in the order the caption names the objects: a model with a layout stage
(models/layout.py) is then fine-tuned on the slot map of these boxes (train/finetune.py).
Every image is decoded once when the dataset is built, so a broken file is reported (and skipped)
before training starts instead of crashing it hours later.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..errors import NanoDiffusionError
from ..images import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


Box = tuple[float, float, float]   # centre x, centre y, half side: fractions of the image


def _boxes(value: object) -> list[Box]:
    """A metadata "boxes" value checked: a list of [cx, cy, half side] fractions (ValueError otherwise)."""
    if not isinstance(value, list):
        raise ValueError
    boxes = []
    for box in value:
        if not (isinstance(box, list) and len(box) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in box)
                and box[2] > 0):
            raise ValueError
        boxes.append(tuple(float(v) for v in box))
    return boxes


def _metadata(folder: Path) -> dict[Path, dict]:
    """metadata.jsonl's entries, keyed by image path: {"text": caption, "boxes": list of Box or None}."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            text = str(entry.get("text", entry.get("caption", "")))
            image = folder / entry["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise NanoDiffusionError(f"{path} line {number} is not a JSON object with a \"file_name\": "
                                     "fix or remove that line") from None
        try:
            boxes = None if entry.get("boxes") is None else _boxes(entry["boxes"])
        except ValueError:
            raise NanoDiffusionError(f"{path} line {number}: \"boxes\" must be a list of [centre x, centre y, "
                                     "half side] fractions of the image (0 to 1, half side > 0): fix or remove "
                                     "it") from None
        entries[image] = {"text": text, "boxes": boxes}
    return entries


def image_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """Every image under the folder (sorted) with its caption ("" when it has none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NanoDiffusionError(f"image folder {folder} does not exist or is not a folder")
    images = sorted(path for path in folder.rglob("*")
                    if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file())
    if not images:
        raise NanoDiffusionError(f"no images in {folder}: add {'/'.join(IMAGE_EXTENSIONS)} files "
                                 "(captions in .txt files beside them or in metadata.jsonl)")
    metadata = _metadata(folder)
    pairs = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        text = metadata[image]["text"] if image in metadata else (
            sidecar.read_text(errors="replace") if sidecar.is_file() else "")
        pairs.append((image, text.strip()))
    return pairs


def _open_rgb(path: Path, size: int | None = None) -> Image.Image:
    """Decode an image upright (EXIF orientation), transparency composited onto white, as RGB."""
    with Image.open(path) as image:
        if size is not None:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
        return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to size x size."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


class ImageFolderDataset(Dataset):
    """Captioned images of a folder -> dict(image=[3, size, size] in [-1, 1], caption=str); object_boxes(i) gives
    image i's boxes when metadata.jsonl has them."""

    def __init__(self, path: str | Path, size: int = 64):
        self.path, self.size = Path(path), size
        self.items, broken = [], []
        self._boxes_of = {image: entry["boxes"] for image, entry in _metadata(self.path).items()}
        for image, text in image_captions(self.path):
            try:
                _open_rgb(image, size)
                self.items.append((image, text))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                broken.append(image.relative_to(self.path).as_posix())
        if broken:
            warnings.warn(f"skipping {len(broken)} unreadable image(s) in {self.path}: {', '.join(broken)}",
                          stacklevel=2)
        if not self.items:
            raise NanoDiffusionError(f"no readable images in {self.path}: every image file failed to decode")

    def object_boxes(self, index: int) -> list[Box] | None:
        """Image i's object boxes from metadata.jsonl, in its caption's object order; None when it has none."""
        return self._boxes_of.get(self.items[index][0])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, text = self.items[index]
        return {"image": to_tensor(center_crop_resize(_open_rgb(path, self.size), self.size))[0], "caption": text}
