"""Run-folder caches are keyed by a fingerprint of the data: a changed folder, caption, VAE or resolution is
encoded again; an unchanged one is reused without running the VAE."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from nanodiffusion.data.folder import ImageFolderDataset
from nanodiffusion.data.shapes import ShapesDataset
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.train.diffusion import cache_latents
from nanodiffusion.train.finetune import finetune

SIZE = 32


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts encode calls (0 calls: the cache was reused)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae, self.calls = vae, 0

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (SIZE, SIZE), color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {color} square")
    return data


def encode(vae: CountingVAE, data, path, size: int = SIZE) -> dict:
    vae.calls = 0
    return cache_latents(vae, ImageFolderDataset(data, size), path)


def test_latents_are_encoded_again_when_the_data_or_the_vae_changes(folder, tmp_path):
    vae = CountingVAE(tiny_pipeline(SIZE).vae)
    path = tmp_path / "latents.pt"
    first = encode(vae, folder, path)
    assert vae.calls == 1 and first["captions"] == ["a red square", "a blue square"]
    again = encode(vae, folder, path)
    assert vae.calls == 0 and torch.equal(again["mean"], first["mean"])

    (folder / "0.txt").write_text("a green square")  # new caption
    assert encode(vae, folder, path)["captions"][0] == "a green square" and vae.calls == 1

    Image.new("RGB", (SIZE, SIZE), "white").save(folder / "1.png")  # same name, new pixels
    os.utime(folder / "1.png", ns=(0, 10**18))
    changed = encode(vae, folder, path)
    assert vae.calls == 1 and not torch.equal(changed["mean"][1], first["mean"][1])

    Image.new("RGB", (SIZE, SIZE), "black").save(folder / "2.png")  # an image added
    assert len(encode(vae, folder, path)["captions"]) == 3 and vae.calls == 1

    assert encode(vae, folder, path, size=2 * SIZE)["mean"].shape[-1] == SIZE and vae.calls == 1  # resolution (the VAE halves it)

    with torch.no_grad():
        next(vae.parameters()).add_(0.1)  # another VAE
    encode(vae, folder, path, size=2 * SIZE)
    assert vae.calls == 1
    encode(vae, folder, path, size=2 * SIZE)
    assert vae.calls == 0


def test_generated_data_settings_and_a_damaged_cache_are_encoded_again(tmp_path):
    vae = CountingVAE(tiny_pipeline(SIZE).vae)
    path = tmp_path / "latents.pt"
    cache_latents(vae, ShapesDataset(2, seed=0, size=SIZE), path)
    vae.calls = 0
    cache_latents(vae, ShapesDataset(2, seed=1, size=SIZE), path)  # another seed: other scenes
    assert vae.calls == 1
    path.write_bytes(b"not a torch file")
    vae.calls = 0
    assert len(cache_latents(vae, ShapesDataset(2, seed=1, size=SIZE), path)["captions"]) == 2
    assert vae.calls == 1


def test_finetune_sees_captions_added_after_it_refused_the_folder(folder, tmp_path):
    for text in folder.glob("*.txt"):
        text.unlink()
    pipe = tiny_pipeline(SIZE, words="a red blue square", max_length=8, text_layers=1)
    settings = dict(data=folder, output=tmp_path / "run", base=pipe, steps=1, batch_size=2, warmup=0,
                    checkpoint_every=1000)
    with pytest.raises(NanoDiffusionError, match="have no caption"):
        finetune("lora", **settings)
    for i, color in enumerate(("red", "blue")):
        (folder / f"{i}.txt").write_text(f"a {color} square")
    assert finetune("lora", **settings).is_file()
