"""ControlNet training on a tiny random model: the layout mask is the scene's geometry without its colours; a few
steps write a diffusers ControlNet folder that loads and steers the pipeline; a killed run resumes exactly."""

from __future__ import annotations

import dataclasses
import random
import shutil

import numpy as np
import pytest
import torch

from nanodiffusion.controlnet_files import load_controlnet, prepare_control_image
from nanodiffusion.data.captions import Prompt
from nanodiffusion.data.conditions import LayoutDataset, inverted, layout_mask, prompt_layout, prompt_scene, swapped
from nanodiffusion.data.shapes import BACKGROUND, PALETTE, Obj, Scene, render, sample_scene
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.train.controlnet import layout_controls, main, train_controlnet
from nanodiffusion.train.loop import TrainConfig, last_checkpoint
from test_finetune import SIZE, one_thread, states, tiny_pipe  # noqa: F401 (one_thread: autouse fixture)

PROMPT = Prompt("position", (("square", "red"), ("circle", "blue")), "left of")


def config(output, steps: int, **overrides) -> TrainConfig:
    return TrainConfig(output=output, **{"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 1, "log_every": 1,
                                         "ema_decay": 0.0, "checkpoint_every": 1000, "preview_every": 0,
                                         **overrides})


def test_layout_mask_is_the_renders_geometry_without_colour():
    for seed in range(6):
        scene = sample_scene(random.Random(seed))
        mask = np.asarray(layout_mask(scene), dtype=np.float32)
        pixels = np.asarray(render(scene), dtype=np.float32)
        assert (mask == mask[..., :1]).all(), "the mask must be gray"
        assert set(np.unique(mask)) >= {0.0, 255.0}
        # render = cover * colour + (1 - cover) * background; read the coverage off each object's colour
        shift = np.abs(pixels - BACKGROUND).max(-1)
        assert np.array_equal(shift > 0, mask[..., 0] > 0), "mask and render cover different pixels"
        for obj in scene.objects:
            ys, xs = np.nonzero(mask[..., 0] > 127)
            near = (np.abs(xs / 64 - obj.cx) < obj.size) & (np.abs(ys / 64 - obj.cy) < obj.size)
            assert near.sum() > 0.3 * (2 * obj.size * 64) ** 2, f"no silhouette at the {obj.shape}"
            full = np.abs(np.array(PALETTE[obj.color], dtype=np.float32) - BACKGROUND).max()
            inside = np.zeros(mask.shape[:2], bool)
            x0, x1 = int((obj.cx - obj.size) * 64), int((obj.cx + obj.size) * 64) + 1
            y0, y1 = int((obj.cy - obj.size) * 64), int((obj.cy + obj.size) * 64) + 1
            inside[y0:y1, x0:x1] = True
            np.testing.assert_allclose(mask[inside, 0] / 255, shift[inside] / full, atol=0.03)
        recoloured = dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, color="green")
                                                              for o in scene.objects))
        assert np.array_equal(np.asarray(layout_mask(recoloured)), mask), "the mask depends on colour"


def test_swapped_layout_inverts_the_relation_and_keeps_the_shapes():
    scene = Scene((Obj("triangle", "red", 0.15, 0.25, 0.5), Obj("circle", "blue", 0.08, 0.75, 0.5)), PROMPT)
    mask = np.asarray(layout_mask(swapped(scene)), dtype=np.float32)[..., 0]
    assert swapped(scene).prompt == inverted(PROMPT) and inverted(PROMPT).relation == "right of"
    assert mask[:, 32:].sum() > 1.2 * mask[:, :32].sum(), "the bigger triangle should now be on the right"
    triangle = mask[int(0.35 * 64):int(0.65 * 64), int(0.6 * 64):int(0.9 * 64)]
    assert triangle[-3:].mean() > 2 * triangle[:3].mean(), "the triangle should still point up"
    assert inverted(Prompt("colors", (("star", "red"),))).relation is None
    for seed in range(5):
        scene = prompt_scene(PROMPT, seed)
        a, b = swapped(scene).objects
        assert (a.cx, a.cy, b.cx, b.cy) == (scene.objects[1].cx, scene.objects[1].cy,
                                            scene.objects[0].cx, scene.objects[0].cy)
    a, b = np.asarray(prompt_layout(PROMPT, 0)), np.asarray(prompt_layout(PROMPT, 1))
    assert not np.array_equal(a, b), "different seeds should give different layouts"


def test_dataset_layouts_feed_the_controlnet_as_the_pipeline_does():
    item = LayoutDataset(4, size=SIZE)[2]
    control = layout_controls(item["layout"][None])
    assert control.shape == (1, 3, SIZE, SIZE)
    mask = layout_mask(sample_scene(random.Random("shapes:0:train:2"), "train"), SIZE)
    torch.testing.assert_close(control, prepare_control_image(mask, SIZE, SIZE), rtol=0, atol=0)


def test_training_writes_a_controlnet_that_loads_and_steers(tmp_path):
    pipe = tiny_pipe()
    before = states(pipe.unet, pipe.text_encoder, pipe.vae)
    folder = train_controlnet(config(tmp_path / "run", 3), base=pipe, dataset_size=16)

    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    for saved, model in zip(before, (pipe.unet, pipe.text_encoder, pipe.vae)):
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()), "the base model changed"
    controlnet = load_controlnet(folder)
    assert any(p.abs().max() > 0 for p in controlnet.controlnet_down_blocks.parameters()), "zero convs never trained"

    scene = prompt_scene(PROMPT, 0)
    mask = layout_mask(scene, SIZE)
    plain = np.asarray(pipe("a red square", steps=3, seed=1)[0], dtype=np.float32)
    pipe.controlnet = controlnet
    steered = np.asarray(pipe("a red square", steps=3, seed=1, control_image=mask)[0], dtype=np.float32)
    assert np.abs(plain - steered).max() > 1.0, "the ControlNet does not change the image"

    torch.manual_seed(0)  # the residuals depend on the control image (exactly not at all before training)
    x, context = torch.randn(1, 4, SIZE // 2, SIZE // 2), torch.randn(1, 8, pipe.unet.config.cross_attention_dim)
    other = layout_mask(swapped(scene), SIZE)
    with torch.no_grad():
        down, mid = controlnet(x, 500, context, prepare_control_image(mask, SIZE, SIZE))
        other_down, other_mid = controlnet(x, 500, context, prepare_control_image(other, SIZE, SIZE))
    assert (mid - other_mid).abs().max() > 1e-5 and (down[0] - other_down[0]).abs().max() > 1e-5


def test_killed_run_resumes_to_the_same_controlnet(tmp_path):
    run = tmp_path / "run"
    straight = load_controlnet(train_controlnet(config(run, 4, checkpoint_every=2), base=tiny_pipe(),
                                                dataset_size=16)).state_dict()
    shutil.rmtree(last_checkpoint(run))  # as if killed between the checkpoints at steps 2 and 4
    shutil.rmtree(run / "controlnet")
    assert last_checkpoint(run).name == "step-0000002"
    resumed = load_controlnet(train_controlnet(config(run, 4, checkpoint_every=2), base=tiny_pipe(),
                                               dataset_size=16)).state_dict()
    logged = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert logged == [1, 2, 3, 4]
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0, msg=key)


def test_cli_refuses_an_image_folder(tmp_path):
    with pytest.raises(NanoDiffusionError, match="--data"):
        main(["--data", str(tmp_path), "--output", str(tmp_path / "run")])
