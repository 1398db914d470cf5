"""The approximate fast paths (nanodiffusion.fast) and half-precision weight storage on tiny models."""

import argparse
import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_pipeline

from nanodiffusion.cli import build_parser, fast_options
from nanodiffusion.data.shapes import render, sample_scene
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.fast import FastOptions
from nanodiffusion.fast.deepcache import deep_cache
from nanodiffusion.fast.preview import LatentPreview
from nanodiffusion.fast.tome import bipartite_merging
from nanodiffusion.images import to_pil, to_tensor
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.storage import store_weights

SIZE = 32
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline()


def generate(pipe: Pipeline, fast: FastOptions = FastOptions(), **kw) -> np.ndarray:
    pipe.fast = fast
    try:
        image = pipe(PROMPT, steps=kw.pop("steps", 6), sampler=kw.pop("sampler", "euler"), cfg=7.0, seed=3, **kw)[0]
    finally:
        pipe.fast = FastOptions()
    return np.asarray(image, dtype=np.float64)


def count_calls(module: torch.nn.Module) -> list[int]:
    """Batch size of every call of `module` (a forward pre-hook), in order."""
    rows = []
    module.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    return rows


def test_options_off_by_default_and_each_leaves_the_exact_path_untouched(pipe):
    assert not FastOptions().enabled and FastOptions.preset().enabled
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pipe.unet.modules()]
    exact = generate(pipe)
    for options in (FastOptions(deepcache=3), FastOptions(tome=0.5), FastOptions(cfg_cutoff=0.5)):
        assert options.enabled
        assert not np.array_equal(generate(pipe, options), exact)
        assert np.array_equal(generate(pipe), exact)   # nothing installed on the UNet is left behind
    assert "forward" not in vars(pipe.unet)   # the DeepCache wrapper is gone
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pipe.unet.modules()] == hooks   # ToMe's


@pytest.mark.parametrize("options", [FastOptions(deepcache=2), FastOptions(tome=0.25), FastOptions(cfg_cutoff=0.8)])
def test_small_settings_stay_close_to_the_exact_image(pipe, options):
    exact = generate(pipe, steps=8)
    diff = np.abs(generate(pipe, options, steps=8) - exact).mean() / 255
    assert 0 < diff < 0.05


def test_deepcache_partial_step_equals_the_full_step_on_the_same_input():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.tiny()).eval().requires_grad_(False)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0]), torch.randn(2, 7, 32)
    with deep_cache(unet, 2) as cache, torch.no_grad():
        full = unet(x, t, context)
        partial = unet(x, t, context)
    assert (cache.full_calls, cache.shallow_calls) == (1, 1)
    torch.testing.assert_close(partial, full, rtol=0, atol=1e-6)


def test_deepcache_runs_the_deep_levels_every_nth_call_only():
    pipe = tiny_pipeline()
    deep = count_calls(pipe.unet.mid_block)
    top = count_calls(pipe.unet.conv_in)
    generate(pipe, FastOptions(deepcache=3), steps=7)
    assert len(top) == 7 and len(deep) == 3   # full calls 0, 3, 6


def test_cfg_cutoff_drops_the_unconditional_pass_for_the_last_steps():
    pipe = tiny_pipeline()
    rows = count_calls(pipe.unet)
    generate(pipe, FastOptions(cfg_cutoff=0.6), steps=10)
    assert rows == [2] * 6 + [1] * 4
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert FastOptions(cfg_cutoff=1.0).guidance_min_sigma(sigmas) is None
    assert FastOptions(cfg_cutoff=0.0).guidance_min_sigma(sigmas) == float("inf")
    assert FastOptions(cfg_cutoff=0.5).guidance_min_sigma(sigmas) == 1.5


def test_deepcache_with_cfg_cutoff_recomputes_when_the_batch_changes():
    pipe = tiny_pipeline()
    deep = count_calls(pipe.unet.mid_block)
    generate(pipe, FastOptions(deepcache=10, cfg_cutoff=0.5), steps=6)
    assert deep == [2, 1]   # a full call at the start and one when guidance stops (batch 2 -> 1)


def test_token_merging_merges_then_restores_tokens():
    h = w = 8
    cells = torch.randn(1, h // 2, w // 2, 16)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, h * w, 16)   # constant 2x2 cells
    merge, unmerge = bipartite_merging(x, torch.Size([h, w]), 0.75, torch.Generator().manual_seed(0))
    merged = merge(x)
    assert merged.shape == (1, h * w // 4, 16)
    torch.testing.assert_close(unmerge(merged), x)   # every source merged into its own cell's destination
    merge, unmerge = bipartite_merging(torch.randn(2, h * w, 16), torch.Size([h, w]), 0.5, torch.Generator())
    y = torch.randn(2, h * w, 16)
    assert merge(y).shape == (2, h * w // 2, 16) and unmerge(merge(y)).shape == y.shape


def test_token_merging_shrinks_the_top_level_self_attention(pipe):
    attention = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    tokens = []
    handle = attention.register_forward_pre_hook(lambda _, args: tokens.append(args[0].shape[1]))
    generate(pipe, FastOptions(tome=0.5), steps=2)
    handle.remove()
    assert tokens == [(SIZE // pipe.vae_scale) ** 2 // 2] * 2


def test_half_weight_storage_keeps_float32_compute_and_stays_close(pipe):
    exact = generate(pipe)
    half = tiny_pipeline()
    for model in (half.unet, half.vae):
        store_weights(model, torch.bfloat16)
    assert half.unet.conv_in.weight.dtype == torch.bfloat16
    assert half.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.unet.conv_norm_out.weight.dtype == torch.float32 and half.unet.conv_in.bias.dtype == torch.float32
    stored = generate(half)
    assert 0 < np.abs(stored - exact).mean() / 255 < 0.02


def test_load_with_weights_dtype_stores_half_weights():
    exact = Pipeline.load(weights_dtype="float32")
    half = Pipeline.load(weights_dtype="bfloat16")
    assert {p.dtype for p in exact.unet.parameters()} == {torch.float32}
    assert half.unet.conv_out.weight.dtype == half.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    kw = dict(steps=4, seed=0, width=64, height=64)
    a, b = (np.asarray(p(PROMPT, **kw)[0], dtype=np.float64) for p in (exact, half))
    assert np.abs(a - b).mean() / 255 < 0.02
    with pytest.raises(NanoDiffusionError, match="weights dtype"):
        Pipeline.load(weights_dtype="int8")


def test_preview_is_the_vae_for_small_latents_and_the_linear_map_for_large_ones(pipe):
    small = torch.randn(2, 4, SIZE // pipe.vae_scale, SIZE // pipe.vae_scale)
    images = pipe.preview(small)
    assert len(images) == 2 and images[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(images[0]), np.asarray(to_pil(pipe.decode(small[:1]))[0]))
    large = torch.randn(1, 4, 40, 40)
    assert pipe.preview(large)[0].size == (40 * pipe.vae_scale, 40 * pipe.vae_scale)
    assert pipe.previewer is not None


def test_preview_decoder_tracks_the_builtin_vae():
    pipe = Pipeline.load()
    rng = random.Random(123)   # other scenes than the fit's
    pixels = torch.cat([to_tensor(render(sample_scene(rng), 64)) for _ in range(4)])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).mode() * pipe.vae.config.scaling_factor
        decoded = F.avg_pool2d(pipe.decode(latents), pipe.vae_scale)
    preview = F.avg_pool2d(LatentPreview.fit(pipe.vae, pipe.vae_scale)(latents), pipe.vae_scale)
    spread = (decoded - decoded.mean((0, 2, 3), keepdim=True)).pow(2).mean()
    assert (preview - decoded).pow(2).mean() < 0.6 * spread   # explains most of the colour variance


def test_cli_flags_build_the_options_and_bad_values_are_clear_errors():
    parse = build_parser().parse_args
    assert fast_options(parse(["generate", "x"])) == FastOptions()
    assert fast_options(parse(["generate", "x", "--fast"])) == FastOptions.preset()
    options = fast_options(parse(["generate", "x", "--fast", "--deepcache", "4", "--tome", "0.3"]))
    assert (options.deepcache, options.tome, options.cfg_cutoff) == (4, 0.3, FastOptions.preset().cfg_cutoff)
    for bad in (dict(deepcache=0), dict(tome=1.0), dict(cfg_cutoff=1.5)):
        with pytest.raises(NanoDiffusionError):
            FastOptions(**bad)
    with pytest.raises(NanoDiffusionError, match="deepcache"):
        fast_options(argparse.Namespace(fast=False, deepcache=0, tome=None, cfg_cutoff=None))


def test_released_pages_read_back_from_the_file_and_anonymous_memory_is_left_alone(tmp_path):
    from safetensors.torch import load_file, save_file

    from nanodiffusion.file_pages import file_mappings, release_pages

    weights = {"w": torch.randn(256, 1024)}   # 1 MiB: whole pages inside
    save_file(weights, tmp_path / "w.safetensors")
    mapped, anonymous = load_file(tmp_path / "w.safetensors")["w"], weights["w"].clone()
    spans = file_mappings()
    assert any(start <= mapped.data_ptr() < end for start, end in spans)   # safetensors maps the file
    release_pages(mapped, spans)
    release_pages(anonymous, spans)
    assert torch.equal(mapped, weights["w"]) and torch.equal(anonymous, weights["w"])
    release_pages(mapped)   # the mappings read by release_pages itself
    assert torch.equal(mapped, weights["w"]) and anonymous.untyped_storage().resizable()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
def test_packed_weights_survive_a_batch_change_and_stay_exact(monkeypatch):
    """A big weight keeps its layout when guidance is dropped (batch 2 -> 1); a layer sized per input (here the
    same convolution, with REPACK_MAX above its size) repacks for the new shape. Both stay exact."""
    from nanodiffusion import packing
    from nanodiffusion.packing import PackedConv2d, packed_layers

    plain = torch.nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        exact = plain(x[:1])
        conv = packed_layers(torch.nn.Sequential(plain))[0]
        assert conv is plain and isinstance(conv, PackedConv2d) and list(conv.state_dict()) == ["weight", "bias"]
        for repack_max, repacks in ((100, False), (1 << 20, True)):
            monkeypatch.setattr(packing, "REPACK_MAX", repack_max)
            conv.packed = None
            conv(x)
            packed = conv.packed[1]
            one = conv(x[:1])   # guidance dropped: batch 2 -> 1
            assert (conv.packed[1] is not packed) == repacks
            assert conv.packed[0][3] == ((1, 8, 6, 6) if repacks else (1, 8, 32, 32))
            conv.packed = None
            assert torch.equal(one, conv(x[:1]))
            torch.testing.assert_close(one, exact)
        assert copy.deepcopy(conv).packed is None   # a copy packs its own weight


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
def test_packing_at_load_leaves_layers_sized_per_input_to_their_first_call(monkeypatch):
    """storage.pack_weights packs big 3x3 weights now; small weights and 1 x 1 convolutions, whose layout follows
    the input's size, pack once on their first call instead of twice."""
    from nanodiffusion import packing
    from nanodiffusion.storage import pack_weights

    monkeypatch.setattr(packing, "REPACK_MAX", 100)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Conv2d(4, 8, 3, padding=1),
                                torch.nn.Conv2d(8, 16, 1)).requires_grad_(False)
    pack_weights(model, torch.float32)
    assert [layer.packed is None for layer in model] == [True, False, True]
    with torch.no_grad():
        model(torch.randn(1, 2, 4, 4))
    assert [layer.packed[0][3] for layer in model] == [(1, 2, 4, 4), (1, 4, 32, 32), (1, 8, 4, 4)]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN")
def test_small_weights_and_1x1_convolutions_repack_per_input_size_big_weights_keep_their_layout(monkeypatch):
    from nanodiffusion import packing

    monkeypatch.setattr(packing, "REPACK_MAX", 100)
    layers = {"small 3x3": torch.nn.Conv2d(2, 4, 3, padding=1), "big 3x3": torch.nn.Conv2d(8, 8, 3, padding=1),
              "big 1x1": torch.nn.Conv2d(16, 16, 1), "big linear": torch.nn.Linear(16, 16)}
    expected_shape = {"small 3x3": (2, 2, 4, 4), "big 3x3": (1, 8, 32, 32), "big 1x1": (2, 16, 4, 4),
                      "big linear": (1024,)}
    for name, layer in layers.items():
        plain = copy.deepcopy(layer).requires_grad_(False)
        layer = packing.packed_layers(torch.nn.Sequential(layer.requires_grad_(False)))[0]
        for side in (32, 4):
            x = torch.randn(2, layer.weight.shape[1], side, side)
            x = x if isinstance(layer, torch.nn.Conv2d) else x.flatten(2).transpose(1, 2)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
        assert layer.packed[0][3] == expected_shape[name], name
