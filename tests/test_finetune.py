"""`nanodiff finetune` on a tiny random model: LoRA learns and leaves the base alone, its file loads back and
changes the images; DreamBooth's prior-preservation loss; the model folder loads; bad data fails early; a model
with a layout stage is fine-tuned on the slot map of the folder's boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from nanodiffusion.data.folder import ImageFolderDataset
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.lora_files import load_lora, read_metadata
from nanodiffusion.models.layout import LayoutConfig, LayoutModel
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from nanodiffusion.models.word_tokenizer import WordTokenizer
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.train.diffusion import DiffusionObjective
from nanodiffusion.train.dreambooth import PriorPreservationObjective
from nanodiffusion.train.finetune import finetune, latent_batch, main, slot_boxes

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


def with_layout(pipe: Pipeline) -> list[torch.Tensor]:
    """Give the pipeline a tiny frozen layout stage and a UNet that reads its map; returns the list into which
    every UNet call puts the map channels it saw."""
    context_dim = pipe.text_encoder.config.hidden_size
    torch.manual_seed(1)
    pipe.layout = LayoutModel(LayoutConfig(context_dim=context_dim, dim=32, heads=2, slot_layers=1, box_layers=2,
                                           map_channels=3)).eval().requires_grad_(False)
    pipe.unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=SIZE // 2, in_channels=4 + 3,
                                                     cross_attention_dim=context_dim)).eval().requires_grad_(False)
    seen, forward = [], pipe.unet.forward
    pipe.unet.forward = lambda x, t, context: seen.append(x[:, 4:].detach().clone()) or forward(x, t, context)
    return seen


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


def test_fine_tuning_paints_the_slot_map_at_the_given_boxes_and_none_without():
    pipe = tiny_pipe()
    seen = with_layout(pipe)
    objective = DiffusionObjective(pipe.unet, pipe.text_encoder, pipe.schedule.alphas_cumprod,
                                   pipe.tokenizer([""])[0], uncond_prob=0.0, layout=pipe.layout)
    ids = pipe.tokenizer(["a red circle", "a blue square", "a red cross"])
    boxes = torch.zeros(3, 4, 4)
    boxes[0, 0] = torch.tensor([1, 0.3, 0.3, 0.15])
    boxes[1, :2] = torch.tensor([[1, 0.7, 0.25, 0.1], [1, 0.4, 0.75, 0.2]])
    batch = {"mean": torch.randn(3, 4, 16, 16), "std": torch.full((3, 4, 16, 16), 0.1), "input_ids": ids,
             "scaling_factor": torch.ones(3), "boxes": boxes, "has_boxes": torch.tensor([True, True, False])}
    loss, logs = objective(batch)
    assert loss.isfinite() and "layout" not in logs
    with torch.no_grad():
        expected = pipe.layout.paint(boxes, pipe.layout.read_slots(pipe.text_encoder(ids)), 16, 16)
    torch.testing.assert_close(seen[0][:2], expected[:2])
    assert expected[:2].abs().amax((1, 2, 3)).min() > 0 and seen[0][2].abs().max() == 0


def test_folder_boxes_reach_the_fine_tuning_slot_map(images, tmp_path):
    pipe = tiny_pipe()
    seen = with_layout(pipe)
    with pytest.warns(UserWarning, match='4 of 4 images in .* have no "boxes" in metadata.jsonl'):
        finetune("lora", data=images, output=tmp_path / "plain", base=pipe, steps=1, batch_size=4, **FAST)
    assert seen and all(m.abs().max() == 0 for m in seen)   # no boxes: no slot map

    lines = [{"file_name": f"{i}.png", "text": (images / f"{i}.txt").read_text(), "boxes": [[0.5, 0.5 + i / 32, 0.25]]}
             for i in range(4)]
    (images / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = slot_boxes(ImageFolderDataset(images, SIZE), slots=4)
    assert got["has_boxes"].all() and got["boxes"][:, 1:].abs().max() == 0
    torch.testing.assert_close(got["boxes"][1, 0], torch.tensor([1.0, 0.5, 0.5 + 1 / 32, 0.25]))
    with pytest.raises(NanoDiffusionError, match=r"0\.png has 1 boxes in metadata.jsonl .* 0 object slots"):
        slot_boxes(ImageFolderDataset(images, SIZE), slots=0)
    seen.clear()
    finetune("lora", data=images, output=tmp_path / "boxed", base=pipe, steps=2, batch_size=4, **FAST)
    assert seen and all(m.abs().amax((1, 2, 3)).min() > 0 for m in seen)   # every image's map painted


def test_shapes_scenes_give_their_own_boxes():
    from nanodiffusion.data.shapes import ShapesDataset

    dataset = ShapesDataset(3)
    got = slot_boxes(dataset, slots=4)
    assert got["has_boxes"].all()
    torch.testing.assert_close(got["boxes"], torch.tensor([dataset.boxes(i) for i in range(3)]))
