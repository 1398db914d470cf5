"""VAE and diffusion objectives, the two training scripts end to end on tiny configs, bad data errors."""

from __future__ import annotations

import json

import pytest
import torch

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.train.diffusion import diffusion_target, min_snr_weight, train_diffusion
from nanodiffusion.train.loop import TrainConfig
from nanodiffusion.train.vae import train_vae

TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64,
}
TINY_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": 32, "attention_head_dim": 2,
}
TINY_LAYOUT = {"dim": 32, "heads": 2, "slot_layers": 1, "box_layers": 1, "map_channels": 4}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def config(tmp_path, name, steps, **overrides):
    return TrainConfig(output=tmp_path / name, steps=steps, batch_size=8, warmup=2, log_every=1,
                       checkpoint_every=100, preview_every=0, threads=1, **overrides)


def losses(folder):
    lines = (folder / "log.csv").read_text().splitlines()
    column = lines[0].split(",").index("loss")
    return [float(line.split(",")[column]) for line in lines[1:]]


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("vae")
    cfg = config(tmp_path, "vae", steps=25, lr=3e-3)
    train_vae(cfg, vae_config=TINY_VAE, dataset_size=64)
    return cfg.output


def test_v_target_recovers_x0_and_eps():
    x0, eps = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    alpha_bar = torch.rand(4, 1, 1, 1) * 0.98 + 0.01
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    v = diffusion_target(x0, eps, alpha_bar, "v_prediction")
    torch.testing.assert_close(alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v, x0)
    torch.testing.assert_close(diffusion_target(x0, eps, alpha_bar, "epsilon"), eps)
    with pytest.raises(NanoDiffusionError):
        diffusion_target(x0, eps, alpha_bar, "sample")


def test_min_snr_weight():
    snr = torch.tensor([0.1, 5.0, 100.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.05]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.1 / 1.1, 5 / 6, 5 / 101]))


def test_vae_training_reduces_loss_and_writes_folder(trained_vae):
    values = losses(trained_vae)
    assert sum(values[-5:]) < 0.7 * sum(values[:5])
    vae_config = json.loads((trained_vae / "vae" / "config.json").read_text())
    assert vae_config["block_out_channels"] == [8, 8]
    assert vae_config["scaling_factor"] != 1.0 and vae_config["scaling_factor"] > 0
    assert (trained_vae / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (trained_vae / "previews").is_dir()


def test_diffusion_training_writes_a_loadable_pipeline(trained_vae, tmp_path):
    from nanodiffusion.train.builtin import load_pipeline_parts, ship

    cfg = config(tmp_path, "diffusion", steps=12, lr=2e-3)
    cfg.preview_every = 12
    train_diffusion(cfg, trained_vae / "vae", dataset_size=64, unet_config=TINY_UNET, text_config=TINY_TEXT,
                    layout_config=TINY_LAYOUT, preview_steps=2)
    assert (cfg.output / "previews" / "step-0000012.png").is_file()
    values = losses(cfg.output)
    assert len(values) == 12 and all(v == v for v in values)
    assert sum(values[-3:]) < 0.95 * sum(values[:3]), values   # it learns, not just runs
    model = cfg.output / "model"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "layout"):
        assert (model / part).is_dir(), part
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"
    unet, vae, text_encoder, tokenizer, _ = load_pipeline_parts(model)
    assert text_encoder.config.vocab_size == len(tokenizer)
    shipped = ship(model, tmp_path / "shipped")
    from safetensors.torch import load_file

    weights = load_file(shipped / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert weights.keys() == unet.state_dict().keys()

    from nanodiffusion.pipeline import Pipeline

    pipe = Pipeline.load(shipped)
    assert pipe.default_size == 64 and pipe.prediction == "epsilon"
    image = pipe("a red circle", steps=2, seed=0)[0]
    assert image.size == (64, 64)


def test_on_a_captioned_folder_the_unet_reads_the_vaes_latents_alone(trained_vae, tmp_path):
    """A folder has no object boxes, so no layout stage: the UNet's channels are the VAE's latent channels, whatever
    the UNet config says (the built-in recipe's says 4 latents + 16 map channels)."""
    from nanodiffusion.data.shapes import write_dataset

    folder = write_dataset(tmp_path / "data", 8)
    cfg = config(tmp_path, "diffusion", steps=2)
    train_diffusion(cfg, trained_vae / "vae", data=str(folder), dataset_size=8, text_config=TINY_TEXT,
                    unet_config={**TINY_UNET, "in_channels": 20, "out_channels": 3}, preview_steps=1)
    unet_config = json.loads((cfg.output / "model" / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["out_channels"]) == (4, 4)
    assert not (cfg.output / "model" / "layout").exists()


def test_bad_data_folder_fails_before_training(tmp_path):
    cfg = config(tmp_path, "run", steps=5)
    with pytest.raises(NanoDiffusionError, match="does not exist"):
        train_vae(cfg, data=str(tmp_path / "missing"), vae_config=TINY_VAE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanoDiffusionError, match="no images"):
        train_vae(cfg, data=str(tmp_path / "empty"), vae_config=TINY_VAE)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_rejects_unknown_kind():
    from nanodiffusion.train.cli import main

    with pytest.raises(NanoDiffusionError, match="vae"):
        main(["gan"])
