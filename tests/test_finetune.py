"""`nanodiff finetune` on a tiny random model: LoRA learns and leaves the base alone, its file loads back and
changes the images; DreamBooth's prior-preservation loss; the model folder loads; bad data fails early."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.lora_files import load_lora, read_metadata
from nanodiffusion.models.word_tokenizer import WordTokenizer
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.train.diffusion import DiffusionObjective
from nanodiffusion.train.dreambooth import PriorPreservationObjective
from nanodiffusion.train.finetune import finetune, latent_batch, main

SIZE = 32
FAST = {"warmup": 2, "log_every": 5, "checkpoint_every": 1000, "ema_decay": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pipe() -> Pipeline:
    return tiny_pipeline(SIZE, words="a red blue circle square cross", max_length=8, text_layers=1)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (color, caption) in enumerate([((220, 40, 40), "a red cross"), ((40, 80, 230), "a blue cross")] * 2):
        image = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
        pixels = np.asarray(image).copy()
        pixels[8 + i:24 + i, 14:18] = color
        pixels[14:18, 8 + i:24 + i] = color
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def states(*models) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def fixed_loss(pipe: Pipeline, cache: dict, captions: list[str]) -> float:
    """The diffusion loss over every image at 16 fixed (t, noise) draws: the same draws before and after."""
    objective = DiffusionObjective(pipe.unet, pipe.text_encoder, pipe.schedule.alphas_cumprod,
                                   pipe.tokenizer([""])[0], uncond_prob=0.0)
    ids = pipe.tokenizer(captions)
    batch = latent_batch(cache, ids, torch.arange(len(ids)).repeat(16), float(pipe.vae.config.scaling_factor))
    torch.manual_seed(123)
    with torch.no_grad():
        return float(objective(batch)[0])


def test_lora_learns_only_lora_weights_and_its_file_changes_the_images(images, tmp_path):
    pipe = tiny_pipe()
    base = states(pipe.unet, pipe.text_encoder, pipe.vae)
    lora_file = finetune("lora", data=images, output=tmp_path / "run", base=pipe, steps=40, batch_size=4, lr=1e-2,
                         rank=4, train_text_encoder=True, **FAST)

    assert lora_file.is_file() and lora_file.suffix == ".safetensors"
    for before, model in zip(base, (pipe.unet, pipe.text_encoder, pipe.vae)):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "base weights changed"
    metadata = read_metadata(lora_file)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_max_train_steps"] == "40"

    cache = torch.load(tmp_path / "run" / "instance_latents.pt")
    before_loss = fixed_loss(pipe, cache, cache["captions"])
    network = load_lora(lora_file, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert any(name.startswith("lora_te_") for name in network.targets)
    network.apply_unmerged(1.0)
    after_loss = fixed_loss(pipe, cache, cache["captions"])
    network.remove()
    assert after_loss < 0.9 * before_loss, (before_loss, after_loss)

    plain = np.asarray(pipe("a red cross", steps=3, seed=1)[0], dtype=np.float32)
    pipe.loras = [(lora_file, 1.0)]
    tuned = np.asarray(pipe("a red cross", steps=3, seed=1)[0], dtype=np.float32)
    assert np.abs(plain - tuned).max() > 1.0


def test_prior_preservation_loss_is_instance_plus_lambda_prior():
    pipe = tiny_pipe()
    objective = DiffusionObjective(pipe.unet, pipe.text_encoder, pipe.schedule.alphas_cumprod,
                                   pipe.tokenizer([""])[0], uncond_prob=0.0)
    g = torch.Generator().manual_seed(0)
    cache = {"mean": torch.randn(6, 4, 16, 16, generator=g), "std": torch.rand(6, 4, 16, 16, generator=g) * 0.1}
    ids = pipe.tokenizer(["a red cross"] * 3 + ["a circle"] * 3)
    instance = latent_batch(cache, ids, torch.tensor([0, 1, 2]), 1.0)
    prior = latent_batch(cache, ids, torch.tensor([3, 4, 5]), 1.0)
    batch = {**instance, **{f"prior_{k}": v for k, v in prior.items()}}

    torch.manual_seed(7)
    loss, logs = PriorPreservationObjective(objective, weight=0.5)(batch)
    torch.manual_seed(7)  # the same draws of t and noise, in the same order
    instance_loss, _ = objective(instance)
    prior_loss, _ = objective(prior)
    assert torch.allclose(loss, instance_loss + 0.5 * prior_loss, rtol=1e-6)
    assert torch.allclose(logs["instance_loss"], instance_loss) and torch.allclose(logs["prior_loss"], prior_loss)
    assert prior_loss > 0 and not torch.allclose(loss, instance_loss)


def test_dreambooth_with_prior_preservation_writes_a_loadable_model(images, tmp_path):
    pipe = tiny_pipe()
    unet_before = states(pipe.unet)[0]
    folder = finetune("dreambooth", data=images, output=tmp_path / "db", base=pipe, steps=4, batch_size=2,
                      lr=1e-3, instance_prompt="a cross", class_prompts=("a circle", "a square"),
                      num_class_images=3, class_steps=2, **FAST)

    class_images = sorted((tmp_path / "db" / "class_images").glob("*.png"))
    assert len(class_images) == 3
    assert (tmp_path / "db" / "class_images" / "0001.txt").read_text().strip() == "a square"
    log = (tmp_path / "db" / "log.csv").read_text().splitlines()
    assert "instance_loss" in log[0] and "prior_loss" in log[0]

    loaded = Pipeline.load(folder)
    assert isinstance(loaded.tokenizer, WordTokenizer) and loaded.default_size == SIZE
    changed = [k for k, v in loaded.unet.state_dict().items() if not torch.equal(v, unet_before[k])]
    assert changed, "DreamBooth did not train the UNet"
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in loaded.vae.state_dict().items())
    assert loaded("a cross", steps=2, seed=0)[0].size == (SIZE, SIZE)
    record = json.loads((tmp_path / "db" / "finetune_config.json").read_text())
    assert record["kind"] == "dreambooth" and record["class_prompts"] == ["a circle", "a square"]

    lora_file = main(["lora", "--model", str(folder), "--data", str(images), "--output", str(tmp_path / "cli"),
                      "--steps", "2", "--batch-size", "2", "--rank", "2", "--warmup", "1", "--threads", "1"])
    assert lora_file == tmp_path / "cli" / "cli.safetensors"
    assert read_metadata(lora_file)["ss_sd_model_name"] == "db"
    load_lora(lora_file, {"unet": loaded.unet})


def test_bad_data_fails_before_training(tmp_path):
    pipe = tiny_pipe()
    empty = tmp_path / "empty"
    empty.mkdir()
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    Image.new("RGB", (SIZE, SIZE), "red").save(uncaptioned / "x.png")
    for data, words in ((tmp_path / "missing", "does not exist"), (empty, "no images"),
                        (uncaptioned, "no caption")):
        with pytest.raises(NanoDiffusionError, match=words):
            finetune("lora", data=data, output=tmp_path / "run", base=pipe, steps=2, **FAST)
        assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(NanoDiffusionError, match="class prompt"):
        finetune("dreambooth", data=uncaptioned, output=tmp_path / "run", base=pipe, num_class_images=2, **FAST)
    (tmp_path / "done" / "checkpoints" / "step-0000010").mkdir(parents=True)
    with pytest.raises(NanoDiffusionError, match="already holds"):
        finetune("lora", data=uncaptioned, output=tmp_path / "done", base=pipe, resume=False, **FAST)
    with pytest.raises(NanoDiffusionError, match="unknown fine-tuning kind"):
        finetune("textual_inversion", data=uncaptioned, output=tmp_path / "run", base=pipe, **FAST)
