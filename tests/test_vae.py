"""AutoencoderKL parity with diffusers: same random weights, same images -> same posterior and reconstruction."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TINY = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=32)
CASES = {"two_levels": TINY, "three_levels_2_layers": dict(TINY, block_out_channels=[16, 32, 32], layers_per_block=2,
                                                           down_block_types=["DownEncoderBlock2D"] * 3,
                                                           up_block_types=["UpDecoderBlock2D"] * 3),
         "no_mid_attention": dict(TINY, mid_block_add_attention=False)}


def pair(config: VAEConfig) -> tuple[DiffusersVAE, AutoencoderKL]:
    """diffusers' VAE with seeded random weights, and ours loaded from its state_dict with no key map."""
    torch.manual_seed(0)
    reference = DiffusersVAE.from_config(config.to_dict()).eval()
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def image(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
@torch.no_grad()
def test_encode_decode_forward_match_diffusers(kw):
    config = VAEConfig(**kw)
    reference, ours = pair(config)
    x = image()
    expected, got = reference.encode(x).latent_dist, ours.encode(x)
    assert (got.mean - expected.mean).abs().max() <= 1e-4
    assert (got.logvar - expected.logvar).abs().max() <= 1e-4
    sample, expected_sample = (q.sample(torch.Generator().manual_seed(3)) for q in (got, expected))
    assert (sample - expected_sample).abs().max() <= 1e-4
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert (ours.decode(z) - reference.decode(z).sample).abs().max() <= 1e-4
    assert (ours(x) - reference(x).sample).abs().max() <= 1e-4


def test_diagonal_gaussian_clamps_samples_and_kl():
    params = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    q = DiagonalGaussian(params)
    assert q.logvar.max() == 20.0 and torch.equal(q.mode(), q.mean)
    standard = DiagonalGaussian(torch.zeros(3, 8, 2, 2))
    assert torch.allclose(standard.kl(), torch.zeros(3))
    a, b = standard.sample(torch.Generator().manual_seed(0)), standard.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.std() > 0.5


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_config_round_trips_through_diffusers(kw):
    config = VAEConfig(**kw)
    reference = DiffusersVAE.from_config(config.to_dict())
    assert VAEConfig.from_dict({**dict(reference.config), "unknown_key": 1}) == config
    ours = {k: v.shape for k, v in AutoencoderKL(config).state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}
    assert "encoder.mid_block.attentions.0.to_q.weight" in ours or not config.mid_block_add_attention


def test_sd_preset_has_diffusers_keys_and_shapes():
    config = VAEConfig.sd()
    with torch.device("meta"):
        reference = DiffusersVAE.from_config(config.to_dict())
        ours = AutoencoderKL(config)
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in reference.state_dict().items()})
    assert config.scaling_factor == 0.18215


def test_bad_block_type_raises_clear_error():
    with pytest.raises(NanoDiffusionError, match="unknown VAE block type"):
        AutoencoderKL(VAEConfig(**dict(TINY, down_block_types=["DownBlock2D"] * 2)))
