"""A user's image folder with captions: the data for training or fine-tuning on their own images.

Images are .png / .jpg / .jpeg / .webp files anywhere under the folder. A caption comes from the
folder's `metadata.jsonl` ({"file_name": ..., "text": ...} per line, the Hugging Face imagefolder
convention), else from a `.txt` file beside the image (the kohya convention), else it is "".
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


def _metadata_captions(folder: Path) -> dict[Path, str]:
    """Captions from metadata.jsonl, keyed by image path."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[folder / entry["file_name"]] = str(entry.get("text", entry.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NanoDiffusionError(f"{path} line {number} is not a JSON object with a \"file_name\": "
                                     "fix or remove that line") from None
    return captions


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
    metadata = _metadata_captions(folder)
    pairs = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        text = metadata.get(image, sidecar.read_text(errors="replace") if sidecar.is_file() else "")
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
    """Captioned images of a folder -> dict(image=[3, size, size] in [-1, 1], caption=str)."""

    def __init__(self, path: str | Path, size: int = 64):
        self.path, self.size = Path(path), size
        self.items, broken = [], []
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

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, text = self.items[index]
        return {"image": to_tensor(center_crop_resize(_open_rgb(path, self.size), self.size))[0], "caption": text}
