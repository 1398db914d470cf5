"""Latent consistency distillation (train/lcm.py): the loss's fixed point, a training step on a tiny pipeline with
a layout stage that writes a loadable LCM folder, and resume after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanodiffusion.samplers import get_sampler
from nanodiffusion.schedules import NoiseSchedule
from nanodiffusion.train.consistency import ConsistencyDistillation, lcm_scalings
from nanodiffusion.train.lcm import guided_teacher, lcm_sigmas

C, SCALE = torch.tensor([0.7, -0.3], dtype=torch.float64), 3.0


def point_mass(x: torch.Tensor, sigma, context: torch.Tensor) -> torch.Tensor:
    """The ideal denoiser of data at the point `context` (an empty context: data at 0)."""
    return context


class ExactLCM(torch.nn.Module):
    """A student whose LCM consistency function is exact for the guided point-mass teacher (plus `error`): the
    guided data is the point w C, whose ODE paths are x(sigma) = w C + sigma k."""

    def __init__(self, schedule: NoiseSchedule, error: float = 0.0):
        super().__init__()
        self.error = torch.nn.Parameter(torch.tensor(error, dtype=torch.float64))
        self.scalings, self.sigma_min = lcm_scalings(schedule), schedule.sigma_min

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x).reshape(-1, 1)
        exact = SCALE * C + (x - SCALE * C) * self.sigma_min / s + self.error
        c_skip, c_out = (c.to(x).reshape(-1, 1) for c in self.scalings(sigma))
        return (exact - c_skip * x) / c_out.clamp(min=1e-12)


def test_lcm_loss_is_zero_at_its_fixed_point_only():
    schedule = NoiseSchedule()
    sigmas = lcm_sigmas(schedule)
    teacher = guided_teacher(point_mass, torch.zeros(1, 2, dtype=torch.float64), SCALE)
    x0, context = torch.randn(256, 2, dtype=torch.float64), C.expand(256, 2)
    exact = ConsistencyDistillation(teacher, ExactLCM(schedule), lambda m: m.denoiser, sigmas,
                                    scalings=lcm_scalings(schedule))
    assert exact.loss(x0, torch.Generator().manual_seed(0), context=context) < 1e-20
    off = ConsistencyDistillation(teacher, ExactLCM(schedule, 0.1), lambda m: m.denoiser, sigmas,
                                  scalings=lcm_scalings(schedule))
    off.target.model.error.data.fill_(0.0)
    assert off.loss(x0, torch.Generator().manual_seed(0), context=context) > 1e-3


def test_the_grid_holds_the_lcm_samplers_levels_and_the_student_denoiser_is_its_consistency_function():
    schedule = NoiseSchedule()
    grid = lcm_sigmas(schedule)
    assert len(grid) == 51 and float(grid[0]) == schedule.sigma_min
    for steps in (1, 2, 4):
        levels = get_sampler("lcm").sigmas(schedule, steps)[:-1]
        assert all(torch.isclose(grid, s, rtol=1e-9).any() for s in levels)
    c_skip, c_out = lcm_scalings(schedule)(grid)
    assert c_skip[0] == 1 and c_out[0] == 0   # the boundary f(x, sigma_min) = x
    assert c_skip[1:].max() < 1e-5 and (1 - c_out[1:]).abs().max() < 1e-5


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """A tiny random pipeline folder with a layout stage (32 px images, 16 x 16 latents, 3 slot-map channels)."""
    from tests.tiny import tiny_pipeline

    from nanodiffusion.models.layout import LayoutConfig, LayoutModel
    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.train.builtin import BUILTIN_SCHEDULER, write_pipeline_folder

    pipe = tiny_pipeline()
    torch.manual_seed(1)
    layout = LayoutModel(LayoutConfig(context_dim=32, dim=32, heads=2, slot_layers=1, box_layers=1,
                                      map_channels=3, sample_steps=4))
    unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=16, in_channels=4 + 3))
    return write_pipeline_folder(tmp_path_factory.mktemp("teacher") / "model", unet, pipe.vae, pipe.text_encoder,
                                 pipe.tokenizer, BUILTIN_SCHEDULER, layout=layout)


def distil(teacher_folder, output, steps: int = 2):
    from nanodiffusion.train.lcm import train_lcm
    from nanodiffusion.train.loop import TrainConfig

    config = TrainConfig(output=output, steps=steps, batch_size=2, lr=1e-3, warmup=0, log_every=1,
                         checkpoint_every=1, preview_every=0, threads=1)
    return train_lcm(config, teacher_folder, dataset_size=4)


def test_distillation_writes_a_loadable_lcm_folder_and_resumes_after_a_kill(teacher_folder, tmp_path, monkeypatch):
    from nanodiffusion.pipeline import Pipeline
    from nanodiffusion.train import finetune

    folder = distil(teacher_folder, tmp_path / "straight")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    student = Pipeline.load(folder)
    assert student.default_cfg == 1.0 and student.layout is not None
    image = student("a red circle above a blue square", steps=2, sampler="lcm", seed=0)[0]
    assert image.size == (32, 32)
    teacher = Pipeline.load(teacher_folder)
    assert any((a != b).any() for a, b in zip(teacher.unet.parameters(), student.unet.parameters()))

    calls, latent_batch = [], finetune.latent_batch

    def killed(*args):
        calls.append(1)
        if len(calls) == 2:   # killed during step 2, after the checkpoint of step 1
            raise KeyboardInterrupt
        return latent_batch(*args)

    monkeypatch.setattr(finetune, "latent_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        distil(teacher_folder, tmp_path / "resumed")
    monkeypatch.undo()
    resumed = Pipeline.load(distil(teacher_folder, tmp_path / "resumed"))
    for a, b in zip(student.unet.state_dict().values(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    logged = [int(line.split(",")[0]) for line in (tmp_path / "resumed" / "log.csv").read_text().splitlines()[1:]]
    assert logged == [1, 2]


def test_shipped_few_step_model_loads_by_name_with_its_own_defaults():
    """`--model builtin-lcm`: the distilled student ships beside the built-in model; its folder's LCMScheduler
    makes 4 LCM steps at cfg 1 the defaults, and an image is drawn in those 4 steps."""
    from nanodiffusion.pipeline import Pipeline

    pipe = Pipeline.load("builtin-lcm")
    assert (pipe.default_steps, pipe.default_sampler, pipe.default_cfg) == (4, "lcm", 1.0)
    steps = []
    image = pipe("a red circle", seed=0, callback=lambda i, total, x0: steps.append(total))[0]
    assert steps == [4] * 4 and image.size == (64, 64)
    assert "Steps: 4, Sampler: LCM" in image.info["parameters"] and np.asarray(image).std() > 10


def test_published_lcm_unet_with_guidance_embedding_matches_diffusers(tmp_path):
    """A guidance-distilled LCM checkpoint (UNet time_cond_proj_dim, LCMScheduler, like LCM-Dreamshaper): our
    Pipeline on diffusers' saved folder gives LatentConsistencyModelPipeline's image to 2/255 at its defaults of 4
    lcm steps, the cfg scale going in as the w embedding (one network pass per step)."""
    from oracles import clip_tokenizer_dir, require

    from nanodiffusion.pipeline import Pipeline

    diffusers, transformers = require("diffusers"), require("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, time_cond_proj_dim=32)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.5)   # so the guidance scale visibly matters
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=37, num_attention_heads=1, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), model_max_length=77)
    reference = diffusers.LatentConsistencyModelPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.save_pretrained(tmp_path / "lcm")
    pipe = Pipeline.load(tmp_path / "lcm", precision="float32")
    assert pipe.guidance_embedded and (pipe.default_steps, pipe.default_sampler) == (4, "lcm")
    images = {}
    for scale in (8.5, 2.0):
        expected = reference("a red circle above a blue square", num_inference_steps=4, guidance_scale=scale,
                             height=64, width=64, generator=torch.Generator().manual_seed(3), output_type="np").images
        ours = np.asarray(pipe("a red circle above a blue square", cfg=scale, seed=3, width=64, height=64)[0])
        assert np.abs(ours / 255 - expected[0]).max() <= 2 / 255
        images[scale] = ours.astype(int)
    assert np.abs(images[8.5] - images[2.0]).max() > 10   # the scale reached the UNet
