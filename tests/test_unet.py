"""UNet parity with diffusers' UNet2DConditionModel: same random weights, same inputs -> same noise prediction."""

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig

SD1 = {}
SD2 = dict(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True, layers_per_block=2)
THREE_LEVELS = dict(block_out_channels=[32, 32, 64], norm_num_groups=32, attention_head_dim=8, cross_attention_dim=24,
                    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1)
CASES = {"sd1": SD1, "sd2": SD2, "inpaint": dict(in_channels=9), "three_levels": THREE_LEVELS,
         "only_cross": dict(only_cross_attention=True, mid_block_type="UNetMidBlock2D")}


def pair(config: UNetConfig) -> tuple[DiffusersUNet, UNet2DConditionModel]:
    """diffusers' UNet with seeded random weights, and ours loaded from its state_dict with no key map."""
    torch.manual_seed(0)
    reference = DiffusersUNet.from_config(config.to_dict()).eval()
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def inputs(config: UNetConfig, batch: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, config.in_channels, size, size, generator=g),
            torch.randn(batch, 7, config.cross_attention_dim, generator=g))


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
@torch.no_grad()
def test_forward_matches_diffusers(kw):
    config = UNetConfig.tiny(**kw)
    reference, ours = pair(config)
    x, context = inputs(config)
    for t in (999, torch.tensor(17.5), torch.tensor([3, 700])):
        expected = reference(x, t, context).sample
        assert (ours(x, t, context) - expected).abs().max() <= 1e-4
        assert expected.abs().mean() > 1e-2


@torch.no_grad()
def test_odd_latent_size_matches_diffusers():
    config = UNetConfig.tiny()
    reference, ours = pair(config)
    x, context = inputs(config, batch=1, size=13)
    assert (ours(x, 10, context) - reference(x, 10, context).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_additional_residuals_match_diffusers():
    config = UNetConfig.tiny()
    reference, ours = pair(config)
    x, context = inputs(config)
    g = torch.Generator().manual_seed(2)
    shapes = [(32, 16), (32, 16), (32, 8), (64, 8)]  # conv_in, level 0 resnet, its downsample, level 1 resnet
    down = [torch.randn(2, c, s, s, generator=g) for c, s in shapes]
    mid = torch.randn(2, 64, 8, 8, generator=g)
    expected = reference(x, 50, context, down_block_additional_residuals=tuple(down),
                         mid_block_additional_residual=mid).sample
    got = ours(x, 50, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - ours(x, 50, context)).abs().max() > 1e-2
    with pytest.raises(NanoDiffusionError, match="residuals"):
        ours(x, 50, context, down_block_additional_residuals=down[:-1])


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_config_round_trips_through_diffusers(kw):
    config = UNetConfig.tiny(**kw)
    reference = DiffusersUNet.from_config(config.to_dict())
    assert UNetConfig.from_dict({**dict(reference.config), "unknown_key": 1}) == config
    ours = {k: v.shape for k, v in UNet2DConditionModel(config).state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("preset", [UNetConfig.sd15, UNetConfig.sd21, lambda: UNetConfig.sd15(in_channels=9)],
                         ids=["sd15", "sd21", "sd15_inpaint"])
def test_full_size_presets_have_diffusers_keys_and_shapes(preset):
    config = preset()
    with torch.device("meta"):
        reference = DiffusersUNet.from_config(config.to_dict())
        ours = UNet2DConditionModel(config)
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in reference.state_dict().items()})


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_attention_runs_in_half_precision(monkeypatch, upcast):
    """upcast_attention (SD 2.x) computes every attention in float32 on half-precision inputs; without it, in bf16."""
    config = UNetConfig.tiny(**{**SD2, "upcast_attention": upcast})
    _, ours = pair(config)
    x, context = inputs(config, batch=1)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        half = ours.to(torch.bfloat16)(x.bfloat16(), 10, context.bfloat16())
        full = ours.float()(x, 10, context)
    calls = len(seen) // 2  # the bf16 run's calls come first
    expected = torch.float32 if upcast else torch.bfloat16
    assert calls > 0 and seen[:calls] == [(expected,) * 3] * calls
    assert half.dtype == torch.bfloat16 and (half.float() - full).abs().max() < 0.2


@pytest.mark.parametrize("kw, message", [(dict(down_block_types=["Bogus", "DownBlock2D"]), "unknown UNet block type"),
                                         (dict(attention_head_dim=[2, 4, 8]), "3 entries"),
                                         (dict(attention_head_dim=3), "attention heads"),
                                         (dict(up_block_types=["UpBlock2D"]), "down_block_types and up_block_types")])
def test_bad_configs_raise_clear_errors(kw, message):
    with pytest.raises(NanoDiffusionError, match=message):
        UNet2DConditionModel(UNetConfig.tiny(**kw))
