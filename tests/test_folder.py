"""User image folders: captions (and object boxes) from .txt or metadata.jsonl, centre crop, clear errors, broken
files skipped."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.data.folder import ImageFolderDataset, image_captions
from nanodiffusion.errors import NanoDiffusionError


def save(path, size=(40, 40), color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_captions_from_txt_metadata_or_empty(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red circle\n")
    save(tmp_path / "sub" / "b.jpg")
    save(tmp_path / "c.webp")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.jpg", "text": "a blue star"}) + "\n\n")
    save(tmp_path / "d.JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    pairs = {path.relative_to(tmp_path).as_posix(): text for path, text in image_captions(tmp_path)}
    assert pairs == {"a.png": "a red circle", "sub/b.jpg": "a blue star", "c.webp": "", "d.JPEG": ""}
    dataset = ImageFolderDataset(tmp_path, size=16)
    assert len(dataset) == 4
    captions = sorted(dataset[i]["caption"] for i in range(4))
    assert captions == ["", "", "a blue star", "a red circle"]


def test_item_is_centre_cropped_resized_in_range(tmp_path):
    image = np.zeros((30, 90, 3), np.uint8)
    image[:, 30:60] = (0, 255, 0)  # the centre square is green, the sides black
    Image.fromarray(image).save(tmp_path / "wide.png")
    item = ImageFolderDataset(tmp_path, size=16)[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"][1], torch.ones(16, 16), atol=0.02)
    assert torch.allclose(item["image"][0], -torch.ones(16, 16), atol=0.02)


def test_transparency_composited_on_white(tmp_path):
    save(tmp_path / "clear.png", color=(0, 0, 0, 0), mode="RGBA")
    assert torch.allclose(ImageFolderDataset(tmp_path, size=8)[0]["image"], torch.ones(3, 8, 8))


def test_missing_or_empty_folder_names_it(tmp_path):
    with pytest.raises(NanoDiffusionError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(NanoDiffusionError, match=f"no images in {tmp_path}"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(NanoDiffusionError, match=f"no images in {tmp_path}"):
        ImageFolderDataset(tmp_path)


def test_broken_images_skipped_with_a_warning_listing_them(tmp_path):
    save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="2 unreadable.*broken.png, truncated.png"):
        dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 1 and dataset[0]["image"].shape == (3, 64, 64)


def test_only_broken_images_is_an_error(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(NanoDiffusionError, match="no readable images"):
        ImageFolderDataset(tmp_path)


def test_bad_metadata_line_is_reported(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n')
    with pytest.raises(NanoDiffusionError, match="metadata.jsonl line 2"):
        ImageFolderDataset(tmp_path)


def test_object_boxes_from_metadata(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a red circle")
    entry = {"file_name": "a.png", "text": "a red circle above a blue square",
             "boxes": [[0.5, 0.25, 0.1], [0.5, 0.75, 1]]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(entry))
    dataset = ImageFolderDataset(tmp_path, size=16)
    assert dataset[0]["caption"] == "a red circle above a blue square"
    assert dataset.object_boxes(0) == [(0.5, 0.25, 0.1), (0.5, 0.75, 1.0)] and dataset.object_boxes(1) is None
    assert not hasattr(dataset, "boxes")   # train/diffusion.py trains a layout stage on datasets with boxes(i)


@pytest.mark.parametrize("boxes", [[0.5, 0.5, 0.1], [[0.5, 0.5]], [[0.5, 1.5, 0.1]], [[0.5, 0.5, 0]],
                                   [["0.5", 0.5, 0.1]], [[True, 0.5, 0.1]], "0.5 0.5 0.1"])
def test_malformed_boxes_are_one_line_naming_the_file_and_line(tmp_path, boxes):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "ok"}) + "\n"
                                             + json.dumps({"file_name": "b.png", "text": "ok", "boxes": boxes}) + "\n")
    with pytest.raises(NanoDiffusionError) as error:
        ImageFolderDataset(tmp_path)
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path / 'metadata.jsonl'} line 2" in message and '"boxes"' in message
