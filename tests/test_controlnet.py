"""ControlNet parity with diffusers' ControlNetModel: same random weights, same inputs -> same residuals; the
diffusers folder and the original single file load (checked against diffusers' own converter); our UNet steered
by our ControlNet equals diffusers' UNet + ControlNet; zero init, from_unet, errors, the control image."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from nanodiffusion.controlnet_files import (diffusers_to_original, load_controlnet, original_to_diffusers,
                                            prepare_control_image, save_controlnet)
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.controlnet import ControlNetConfig, ControlNetModel, check_base, controlnet_unet
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from nanodiffusion.pipeline import Pipeline
from test_pipeline_parity import PROMPT, SIZE, generators, pixels, scheduler, tiny_components

HINT = dict(conditioning_embedding_out_channels=[8, 8, 16, 16])   # 3 stride-2 convs: control image = 8x latent
CASES = {"sd1": {},
         "sd2": dict(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True, layers_per_block=2),
         "plain_mid": dict(mid_block_type="UNetMidBlock2D", flip_sin_to_cos=False, freq_shift=1)}
# Single files carry no head count or group count: the loader infers SD's (8 heads, 32 groups), so these use them.
INFERABLE = dict(norm_num_groups=32, attention_head_dim=8)
SD15_BLOCKS = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=2,   # SD 1.5's structure, tiny widths
                   down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                   up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_zero_layers(model: torch.nn.Module) -> None:
    """Give the zero-initialised layers (zero convs, conditioning conv_out) random weights, so they carry signal."""
    g = torch.Generator().manual_seed(3)
    zero_layers = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(zero_layers):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def pair(unet_config: UNetConfig) -> tuple[DiffusersControlNet, ControlNetModel]:
    """diffusers' ControlNet with seeded random weights, and ours loaded from its state_dict with no key map."""
    config = ControlNetConfig.from_unet_config(unet_config, **HINT)
    torch.manual_seed(0)
    reference = DiffusersControlNet.from_config(config.to_dict()).eval()
    randomize_zero_layers(reference)
    ours = ControlNetModel(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def inputs(config: UNetConfig, batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, config.in_channels, size, size, generator=g),
            torch.randn(batch, 7, config.cross_attention_dim, generator=g),
            torch.rand(batch, 3, 8 * size, 8 * size, generator=g))


def max_diff(ours: tuple[list[torch.Tensor], torch.Tensor], reference: tuple) -> float:
    """Largest difference over all down residuals and the mid residual."""
    (down, mid), (ref_down, ref_mid) = ours, reference
    assert len(down) == len(ref_down)
    return max((a - b).abs().max().item() for a, b in zip([*down, mid], [*ref_down, ref_mid]))


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
@torch.no_grad()
def test_residuals_match_diffusers(kw):
    unet_config = UNetConfig.tiny(**kw)
    reference, ours = pair(unet_config)
    x, context, image = inputs(unet_config)
    for t, scale in ((999, 1.0), (torch.tensor([3, 700]), 0.6)):
        expected = reference(x, t, context, image, conditioning_scale=scale, return_dict=False)
        assert max_diff(ours(x, t, context, image, scale), expected) <= 1e-4
        assert expected[1].abs().mean() > 1e-3


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_config_and_keys_match_diffusers(kw):
    config = ControlNetConfig.from_unet_config(UNetConfig.tiny(**kw), **HINT)
    reference = DiffusersControlNet.from_config(config.to_dict())
    assert ControlNetConfig.from_dict({**dict(reference.config), "unknown_key": 1}) == config
    ours = {k: v.shape for k, v in ControlNetModel(config).state_dict().items()}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}


@torch.no_grad()
def test_zero_init_and_from_unet():
    """A fresh ControlNet adds nothing (zero convolutions, §3.1); from_unet copies the encoder as diffusers does."""
    unet_config = UNetConfig.tiny()
    torch.manual_seed(0)
    reference_unet = DiffusersUNet.from_config(unet_config.to_dict())
    unet = UNet2DConditionModel(unet_config).eval()
    unet.load_state_dict(reference_unet.state_dict())
    ours = ControlNetModel.from_unet(unet, **HINT).eval()
    reference = DiffusersControlNet.from_unet(reference_unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    copied = [k for k in reference.state_dict() if not k.startswith("controlnet_")]
    assert copied and all(torch.equal(ours.state_dict()[k], reference.state_dict()[k]) for k in copied)
    x, context, image = inputs(unet_config)
    down, mid = ours(x, 10, context, image)
    assert all(r.abs().max() == 0 for r in [*down, mid])
    net = controlnet_unet(unet, ours, image[:1])
    assert torch.equal(net(x, torch.tensor(10), context), unet(x, 10, context))


@torch.no_grad()
def test_steered_unet_matches_diffusers():
    """net(x, t, context) = our UNet + our ControlNet == diffusers' UNet fed diffusers' ControlNet residuals, on a
    classifier-free-guidance batch [uncond, cond] with one control image repeated to it."""
    unet_config = UNetConfig.tiny()
    torch.manual_seed(0)
    reference_unet = DiffusersUNet.from_config(unet_config.to_dict()).eval()
    unet = UNet2DConditionModel(unet_config).eval()
    unet.load_state_dict(reference_unet.state_dict())
    reference, controlnet = pair(unet_config)
    x, context, image = inputs(unet_config, batch=4)
    t, scale = torch.tensor(421.0), 0.8
    down, mid = reference(x, t, context, image[:1].repeat(4, 1, 1, 1), conditioning_scale=scale, return_dict=False)
    expected = reference_unet(x, t, context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
    got = controlnet_unet(unet, controlnet, image[:1], scale)(x, t, context)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - unet(x, t, context)).abs().max() > 1e-2


@pytest.mark.parametrize("blocks", [{}, SD15_BLOCKS], ids=["tiny", "sd15_blocks"])
def test_original_single_file_matches_diffusers_converter(tmp_path, blocks):
    """Our table writes the original layout; diffusers' convert_controlnet_checkpoint reads it back to the same
    state dict, and load_controlnet reads it (with or without control_model.) to the same residuals."""
    unet_config = UNetConfig.tiny(**INFERABLE, **blocks)
    reference, _ = pair(unet_config)
    sd = reference.state_dict()
    original = diffusers_to_original(sd)
    assert {"control_model.zero_convs.0.0.weight", "control_model.middle_block_out.0.bias",
            "control_model.input_hint_block.14.weight", "control_model.input_blocks.1.1.proj_in.weight",
            "control_model.middle_block.2.emb_layers.1.weight"} <= original.keys()
    converted = convert_controlnet_checkpoint(original, {"layers_per_block": unet_config.layers_per_block})
    assert converted.keys() == sd.keys() and all(torch.equal(converted[k], sd[k]) for k in sd)
    assert all(torch.equal(original_to_diffusers(original)[k], sd[k]) for k in sd)

    x, context, image = inputs(unet_config)
    with torch.no_grad():
        expected = reference(x, 500, context, image, return_dict=False)
    unprefixed = {k.removeprefix("control_model."): t for k, t in original.items()}
    full_model = {**original, "model.diffusion_model.conv_in.weight": torch.zeros(1)}
    for name, tensors in (("prefixed", original), ("unprefixed", unprefixed), ("full", full_model)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        ours = load_controlnet(tmp_path / f"{name}.safetensors")
        with torch.no_grad():
            assert max_diff(ours(x, 500, context, image), expected) <= 1e-4


def test_diffusers_folder_both_directions(tmp_path):
    """Their save -> our load gives the same residuals; our save (folder and single file) -> their / our load."""
    unet_config = UNetConfig.tiny(**CASES["sd2"])
    reference, ours = pair(unet_config)
    reference.save_pretrained(tmp_path / "theirs")
    x, context, image = inputs(unet_config)
    with torch.no_grad():
        expected = reference(x, 7, context, image, return_dict=False)
        assert max_diff(load_controlnet(tmp_path / "theirs")(x, 7, context, image), expected) <= 1e-4
    save_controlnet(ours, tmp_path / "ours")
    loaded = DiffusersControlNet.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in ours.state_dict().items())
    save_controlnet(ours, tmp_path / "ours.safetensors")   # non-inferable heads: the config rides in the metadata
    assert "control_model.zero_convs.0.0.weight" in load_file(tmp_path / "ours.safetensors")
    with torch.no_grad():
        assert max_diff(load_controlnet(tmp_path / "ours.safetensors")(x, 7, context, image), expected) <= 1e-4


def test_errors(tmp_path):
    sd1 = UNetConfig.tiny()
    other_base = ControlNetConfig.from_unet_config(UNetConfig.tiny(cross_attention_dim=48), **HINT)
    with pytest.raises(NanoDiffusionError, match=r"another base.*cross_attention_dim=48.*cross_attention_dim=32"):
        check_base(sd1, other_base)
    with pytest.raises(NanoDiffusionError, match="another base"):
        controlnet_unet(UNet2DConditionModel(sd1), ControlNetModel(other_base), torch.zeros(1, 3, 64, 64))
    sd = ControlNetModel(ControlNetConfig.from_unet_config(UNetConfig.tiny(**INFERABLE), **HINT)).state_dict()
    del sd["controlnet_mid_block.bias"]
    save_file(diffusers_to_original(sd), tmp_path / "missing.safetensors")
    with pytest.raises(NanoDiffusionError, match="ControlNet: 1 missing keys.*controlnet_mid_block.bias"):
        load_controlnet(tmp_path / "missing.safetensors")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, tmp_path / "sd.safetensors")
    with pytest.raises(NanoDiffusionError, match="not a ControlNet"):
        load_controlnet(tmp_path / "sd.safetensors")


def test_control_image_matches_diffusers():
    g = torch.Generator().manual_seed(4)
    pixels = (torch.rand(37, 51, 3, generator=g) * 255).to(torch.uint8).numpy()
    for image in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0]).convert("L")):
        ours = prepare_control_image(image, 64, 48)
        expected = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(
            image, height=48, width=64)
        assert ours.shape == (1, 3, 48, 64) and 0 <= ours.min() and ours.max() <= 1
        assert (ours - expected).abs().max() <= 1e-6


def test_pipeline_images_match_diffusers(tmp_path):
    """Our Pipeline with a loaded ControlNet gives the images of diffusers'
    StableDiffusionControlNetPipeline (tiny random SD from test_pipeline_parity, Euler, CFG 6, scale 0.7)."""
    components = tiny_components()
    diffusers.StableDiffusionPipeline(**components, scheduler=scheduler("euler", "default")).save_pretrained(
        tmp_path / "sd")
    torch.manual_seed(0)
    reference = DiffusersControlNet.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    randomize_zero_layers(reference)
    reference.save_pretrained(tmp_path / "controlnet")
    g = torch.Generator().manual_seed(5)
    control = Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())
    ref = diffusers.StableDiffusionControlNetPipeline(**components, controlnet=reference.eval(),
                                                      scheduler=scheduler("euler", "default"))
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, image=control, controlnet_conditioning_scale=0.7, num_inference_steps=4,
                   guidance_scale=6.0, height=SIZE, width=SIZE, generator=generators(2, 1), output_type="np").images

    pipe = Pipeline.load(tmp_path / "sd")
    plain = pipe(PROMPT, steps=4, sampler="euler", cfg=6.0, seed=2, width=SIZE, height=SIZE)
    pipe.controlnet = load_controlnet(tmp_path / "controlnet")
    ours = pipe(PROMPT, steps=4, sampler="euler", cfg=6.0, seed=2, width=SIZE, height=SIZE, control_image=control,
                control_scale=0.7)
    assert np.abs(pixels(ours) - expected).max() <= 2 / 255
    assert np.abs(pixels(plain) - expected).max() > 4 / 255
