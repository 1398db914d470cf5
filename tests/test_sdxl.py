"""SDXL parity with diffusers / transformers: the UNet with its added conditioning, both text encoders, the prompt
conditioning of StableDiffusionXLPipeline, and both on-disk layouts (diffusers folder, original single file)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanodiffusion.checkpoint_keys import diffusers_to_original, has_prefix, original_to_diffusers, text_model_names
from nanodiffusion.checkpoints import detect_version, load_checkpoint, load_state_dict, save_diffusers, save_single_file
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.loading import load_sdxl
from nanodiffusion.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from nanodiffusion.models.vae import AutoencoderKL, VAEConfig
from nanodiffusion.sdxl import (MicroConditioning, SDXLConditioning, encode_prompts, encode_text, sdxl_conditioning,
                                vae_config)
from oracles import clip_tokenizer_dir, require
from test_controlnet import randomize_zero_layers

diffusers = require("diffusers")
transformers = require("transformers")
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,  # noqa: E402
                                                 convert_open_clip_checkpoint)

TIME_DIM, POOLED, CONTEXT = 8, 16, 32 + 24     # tiny: time-id sinusoid width, bigG projection, CLIP-L + bigG widths


def tiny_unet_config(time_ids: int = 6, context: int = CONTEXT, **kw) -> UNetConfig:
    """A two-level SDXL-shaped UNet: no attention at the top level, depth 2 below, linear projections, text_time."""
    return UNetConfig.tiny(**{"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                              "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
                              "use_linear_projection": True, "cross_attention_dim": context,
                              "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_DIM,
                              "projection_class_embeddings_input_dim": POOLED + time_ids * TIME_DIM, **kw})


def unet_pair(config: UNetConfig):
    """diffusers' UNet with seeded random weights, and ours loaded from its state_dict (strict)."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel.from_config(config.to_dict()).eval()
    ours = UNet2DConditionModel(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def unet_inputs(config: UNetConfig, time_ids: list[float], batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, config.in_channels, 16, 16, generator=g),
            torch.randn(batch, 7, config.cross_attention_dim, generator=g),
            {"text_embeds": torch.randn(batch, POOLED, generator=g),
             "time_ids": torch.tensor([time_ids] * batch, dtype=torch.float32)})


UNET_CASES = {"base": (tiny_unet_config(), [1024, 768, 0, 16, 1024, 1024]),
              "inpaint": (tiny_unet_config(in_channels=9), [512, 512, 0, 0, 512, 512]),
              "refiner": (tiny_unet_config(time_ids=5, context=24), [1024, 1024, 0, 0, 6.0])}


@pytest.mark.parametrize("config, time_ids", UNET_CASES.values(), ids=UNET_CASES.keys())
@torch.no_grad()
def test_unet_with_added_conditioning_matches_diffusers(config, time_ids):
    reference, ours = unet_pair(config)
    x, context, added = unet_inputs(config, time_ids)
    for t in (999, torch.tensor([3, 700])):
        expected = reference(x, t, context, added_cond_kwargs=added).sample
        got = ours(x, t, context, **added)
        assert (got - expected).abs().max() <= 1e-5
        assert expected.abs().mean() > 1e-2
    other = {**added, "time_ids": added["time_ids"] * 0.5}
    assert (ours(x, 10, context, **other) - ours(x, 10, context, **added)).abs().max() > 1e-3


def test_unet_added_conditioning_errors():
    config, _ = UNET_CASES["base"]
    _, ours = unet_pair(config)
    x, context, added = unet_inputs(config, [1, 2, 3, 4, 5, 6])
    with pytest.raises(NanoDiffusionError, match="needs text_embeds"):
        ours(x, 10, context)
    with pytest.raises(NanoDiffusionError, match="6 time ids"):
        ours(x, 10, context, text_embeds=added["text_embeds"], time_ids=added["time_ids"][:, :5])
    plain = UNet2DConditionModel(UNetConfig.tiny())
    with pytest.raises(NanoDiffusionError, match="no added conditioning"):
        plain(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, 32), **{k: v[:1] for k, v in added.items()})
    with pytest.raises(NanoDiffusionError, match="addition_embed_type"):
        UNet2DConditionModel(UNetConfig.tiny(addition_embed_type="text_image"))
    with pytest.raises(NanoDiffusionError, match="needs addition_time_embed_dim"):
        UNet2DConditionModel(UNetConfig.tiny(addition_embed_type="text_time"))


@pytest.mark.parametrize("preset", [UNetConfig.sdxl, UNetConfig.sdxl_refiner, lambda: UNetConfig.sdxl(in_channels=9)],
                         ids=["sdxl", "refiner", "sdxl_inpaint"])
def test_full_size_sdxl_presets_have_diffusers_keys_and_shapes(preset):
    config = preset()
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config.to_dict())
        ours = UNet2DConditionModel(config)
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in reference.state_dict().items()})
    assert UNetConfig.from_dict(dict(reference.config)) == config


# ---- Text encoders ----

def text_configs() -> tuple[dict, dict]:
    """Tiny CLIP ViT-L-like (quick_gelu) and bigG-like (gelu, projection) configs over the real vocabulary."""
    common = dict(vocab_size=49408, intermediate_size=48, max_position_embeddings=77, num_attention_heads=4)
    return (dict(common, hidden_size=32, num_hidden_layers=3, hidden_act="quick_gelu", eos_token_id=49407),
            dict(common, hidden_size=24, num_hidden_layers=3, hidden_act="gelu", projection_dim=POOLED,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1))


@pytest.fixture(scope="module")
def text_pairs():
    """transformers' CLIPTextModel / CLIPTextModelWithProjection (seeded) and ours with the same weights."""
    first, second = text_configs()
    torch.manual_seed(0)
    reference = (transformers.CLIPTextModel(transformers.CLIPTextConfig(**first)).eval(),
                 transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**second)).eval())
    ours = (CLIPTextModel(CLIPTextConfig.from_dict(first)).eval(),
            CLIPTextModelWithProjection(CLIPTextConfig.from_dict(second)).eval())
    for theirs, mine in zip(reference, ours):
        mine.load_state_dict(text_model_names(theirs.state_dict()), strict=True)
    return reference, ours


@pytest.fixture(scope="module")
def tokenizers():
    """Ours and transformers' tokenizers over the real CLIP vocabulary: CLIP-L pads with the end token, bigG with
    "!" (as SDXL's tokenizer_2/special_tokens_map.json says)."""
    folder = str(clip_tokenizer_dir())
    ours = (CLIPTokenizer.from_folder(folder), CLIPTokenizer.from_folder(folder, pad_token="!"))
    theirs = (transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77),
              transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!"))
    return ours, theirs


PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red circle above a blue square, highly detailed"]


def test_tokenizers_match_transformers_and_bigG_pads_with_bang(tokenizers):
    ours, theirs = tokenizers
    for mine, reference in zip(ours, theirs):
        expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        assert torch.equal(mine(PROMPTS), expected)
    assert ours[1].pad_token_id == 0 and ours[0].pad_token_id == ours[0].eos_token_id == 49407
    assert ours[1](PROMPTS)[0, -1] == 0


@torch.no_grad()
def test_text_encoders_match_transformers(text_pairs, tokenizers):
    (reference, reference_2), (ours, ours_2) = text_pairs
    for theirs, mine, tokenizer in ((reference, ours, tokenizers[0][0]), (reference_2, ours_2, tokenizers[0][1])):
        ids = tokenizer(PROMPTS)
        out = theirs(ids, output_hidden_states=True)
        states = mine.hidden_states(ids)
        assert len(states) == len(out.hidden_states)
        for got, expected in zip(states, out.hidden_states):
            assert (got - expected).abs().max() <= 1e-5
        assert (mine(ids) - out.last_hidden_state).abs().max() <= 1e-5
    out = reference_2(ids, output_hidden_states=True)
    assert (ours_2.text_embeds(ours_2.hidden_states(ids)[-1], ids) - out.text_embeds).abs().max() <= 1e-5
    assert "text_projection.weight" in ours_2.state_dict() and "text_projection.bias" not in ours_2.state_dict()


# ---- Prompt conditioning (StableDiffusionXLPipeline.encode_prompt + _get_add_time_ids) ----

def reference_pipeline(text_pairs, tokenizers, *, refiner: bool = False):
    """diffusers' SDXL pipeline (the refiner: img2img with aesthetic scores, bigG only) on the tiny parts."""
    (reference, reference_2), _ = text_pairs
    vae = diffusers.AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    config = tiny_unet_config(time_ids=5, context=24) if refiner else tiny_unet_config()
    unet = diffusers.UNet2DConditionModel.from_config(config.to_dict())
    parts = dict(vae=vae, text_encoder=None if refiner else reference, text_encoder_2=reference_2,
                 tokenizer=None if refiner else tokenizers[1][0], tokenizer_2=tokenizers[1][1], unet=unet,
                 scheduler=diffusers.EulerDiscreteScheduler())
    if refiner:
        return diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False)
    return diffusers.StableDiffusionXLPipeline(**parts)


def assert_close(ours: SDXLConditioning, context, pooled, time_ids):
    for got, expected in zip(ours, (context, pooled, time_ids)):
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5


SIZES = dict(original_size=(768, 1024), crops_coords_top_left=(16, 0), target_size=(1024, 896))


@pytest.mark.parametrize("negative, clip_skip", [(None, 1), ("blurry, low quality", 1), ("", 2)],
                         ids=["zeros", "negative", "clip_skip"])
@torch.no_grad()
def test_conditioning_matches_diffusers_encode_prompt(text_pairs, tokenizers, negative, clip_skip):
    pipe = reference_pipeline(text_pairs, tokenizers)
    (ours, ours_2), (tok, tok_2) = text_pairs[1], tokenizers[0]
    context, negative_context, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=None if negative is None else [negative] * 2,
        clip_skip=None if clip_skip == 1 else clip_skip - 1)
    time_ids = pipe._get_add_time_ids(SIZES["original_size"], SIZES["crops_coords_top_left"], SIZES["target_size"],
                                      dtype=torch.float32, text_encoder_projection_dim=POOLED).repeat(2, 1)
    negative_ids = None if negative is None else (tok([negative] * 2), tok_2([negative] * 2))
    cond, uncond = sdxl_conditioning(ours, ours_2, (tok(PROMPTS), tok_2(PROMPTS)), MicroConditioning(**SIZES),
                                     negative_ids=negative_ids, clip_skip=clip_skip)
    assert_close(cond, context, pooled, time_ids)
    assert_close(uncond, negative_context, negative_pooled, time_ids)
    assert (uncond.context.abs().max() == 0) == (negative is None)


@torch.no_grad()
def test_refiner_conditioning_matches_diffusers(text_pairs, tokenizers):
    pipe = reference_pipeline(text_pairs, tokenizers, refiner=True)
    ours_2, tok_2 = text_pairs[1][1], tokenizers[0][1]
    context, negative_context, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    time_ids, negative_time_ids = pipe._get_add_time_ids(
        (1024, 1024), (0, 0), (1024, 1024), 6.0, 2.5, (1024, 1024), (0, 0), (1024, 1024), dtype=torch.float32,
        text_encoder_projection_dim=POOLED)
    micro = MicroConditioning(aesthetic_score=6.0)
    with pytest.raises(NanoDiffusionError, match="force_zeros_for_empty_prompt"):
        sdxl_conditioning(None, ours_2, (None, tok_2(PROMPTS)), micro, force_zeros_for_empty_prompt=False)
    cond, uncond = sdxl_conditioning(None, ours_2, (None, tok_2(PROMPTS)), micro, negative_ids=(None, tok_2(["", ""])),
                                     force_zeros_for_empty_prompt=False)
    assert_close(cond, context, pooled, time_ids.repeat(2, 1))
    assert_close(uncond, negative_context, negative_pooled, negative_time_ids.repeat(2, 1))
    assert cond.context.shape[-1] == 24 and cond.time_ids[0].tolist() == [1024, 1024, 0, 0, 6.0]


@torch.no_grad()
def test_prompts_read_the_web_ui_syntax_chunks_and_emphasis_per_encoder(text_pairs, tokenizers):
    """SDXL prompts take the web UI's syntax: a plain prompt is encode_text of its ids (diffusers' encoding); BREAK
    or more than 75 tokens make chunks, each encoded alone and concatenated, with bigG's pooled output from the
    first; emphasis scales each encoder's states and restores that encoder's mean; the refiner (bigG alone) too."""
    from nanodiffusion.prompts import emphasised

    (te, te_2), (tok, tok_2) = text_pairs[1], tokenizers[0]
    for ours, theirs in zip(encode_prompts(te, te_2, tok, tok_2, PROMPTS),
                            encode_text(te, te_2, tok(PROMPTS), tok_2(PROMPTS))):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)   # one prompt at a time vs a batch of two
    chunks = [encode_text(te, te_2, tok([text]), tok_2([text])) for text in ("a photo", "a red circle")]
    context, pooled = encode_prompts(te, te_2, tok, tok_2, ["a photo BREAK a red circle"])
    torch.testing.assert_close(context, torch.cat([c for c, _ in chunks], dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, chunks[0][1], rtol=0, atol=1e-5)
    assert encode_prompts(te, te_2, tok, tok_2, [" ".join(["red circle"] * 50)])[0].shape == (1, 2 * 77, 32 + 24)
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5                                  # [start, a, red, circle, end, ...]
    context, pooled = encode_prompts(te, te_2, tok, tok_2, ["a (red:1.5) circle"])
    plain_context, plain_pooled = encode_text(te, te_2, tok(["a red circle"]), tok_2(["a red circle"]))
    for ours, plain in ((context[..., :32], plain_context[..., :32]), (context[..., 32:], plain_context[..., 32:])):
        torch.testing.assert_close(ours, emphasised(plain, weights), rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, plain_pooled, rtol=0, atol=1e-5)
    refined, _ = encode_prompts(None, te_2, tok_2, tok_2, ["a (red:1.5) circle"])
    torch.testing.assert_close(refined, emphasised(encode_text(None, te_2, None, tok_2(["a red circle"]))[0], weights),
                               rtol=0, atol=1e-5)


@torch.no_grad()
def test_conditioning_drives_the_unet_as_diffusers_does(text_pairs, tokenizers):
    """The whole conditional branch: our conditioning into our UNet = diffusers' into diffusers'."""
    reference, ours = unet_pair(tiny_unet_config())
    (te, te_2), (tok, tok_2) = text_pairs[1], tokenizers[0]
    cond, _ = sdxl_conditioning(te, te_2, (tok(PROMPTS), tok_2(PROMPTS)), MicroConditioning(**SIZES))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = reference(x, 500, cond.context, added_cond_kwargs={"text_embeds": cond.text_embeds,
                                                                  "time_ids": cond.time_ids}).sample
    got = ours(x, 500, cond.context, text_embeds=cond.text_embeds, time_ids=cond.time_ids)
    assert (got - expected).abs().max() <= 1e-5


# ---- Loading: original single files and diffusers folders ----

def full_parts(refiner: bool = False, in_channels: int = 4) -> dict:
    """Tiny SDXL networks built by diffusers / transformers, shaped so that configs inferred from a single file
    (64-wide heads, 32 groups) rebuild them: {"unet", "vae", "text_encoder", "text_encoder_2"} modules (a UNet of
    9 input channels: SDXL inpainting)."""
    torch.manual_seed(4)
    big_g = dict(vocab_size=49408, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=48, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1)
    unet = UNetConfig.tiny(**{"block_out_channels": [64, 128], "norm_num_groups": 32, "in_channels": in_channels,
                              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                              "transformer_layers_per_block": [1, 2], "attention_head_dim": [1, 2],
                              "use_linear_projection": True, "cross_attention_dim": 64 if refiner else 128,
                              "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                              "projection_class_embeddings_input_dim": 48 + (5 if refiner else 6) * 256})
    models = {"unet": diffusers.UNet2DConditionModel.from_config(unet.to_dict()),
              "vae": diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                                             down_block_types=["DownEncoderBlock2D"] * 2,
                                             up_block_types=["UpDecoderBlock2D"] * 2),
              "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**big_g))}
    if not refiner:
        models["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **{**big_g, "hidden_act": "quick_gelu", "intermediate_size": 80, "projection_dim": 64}))
    return {name: model.eval() for name, model in models.items()}


def state_dicts(models: dict) -> dict:
    return {name: text_model_names(m.state_dict()) if name.startswith("text") else m.state_dict()
            for name, m in models.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_single_file_layout_matches_diffusers_converter():
    models = full_parts()
    parts = state_dicts(models)
    original = diffusers_to_original(parts)
    g = "conditioner.embedders.1.model."
    assert original[g + "transformer.resblocks.1.attn.in_proj_weight"].shape == (192, 64)
    assert torch.equal(original[g + "text_projection"], parts["text_encoder_2"]["text_projection.weight"].T)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in original
    assert "model.diffusion_model.label_emb.0.2.weight" in original
    assert detect_version(original) == "xl"
    assert_same(convert_ldm_unet_checkpoint(original, dict(models["unet"].config)), parts["unet"])
    assert_same(text_model_names(convert_open_clip_checkpoint(models["text_encoder_2"], original, prefix=g)),
                parts["text_encoder_2"])
    assert_same(text_model_names(convert_ldm_clip_checkpoint(original)), parts["text_encoder"])
    back = original_to_diffusers({**original, g + "logit_scale": torch.tensor(4.6)})
    for name in parts:
        assert_same(back[name], parts[name])


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
@torch.no_grad()
def test_single_file_loads_and_round_trips_exactly(tmp_path, refiner):
    models = full_parts(refiner)
    parts = state_dicts(models)
    original = diffusers_to_original(parts)
    assert (refiner, refiner) == (has_prefix(original, "conditioner.embedders.0.model."),
                                  not has_prefix(original, "conditioner.embedders.1."))
    save_file(original, tmp_path / "sdxl.safetensors")        # no metadata, as published files: configs inferred
    loaded = load_sdxl(tmp_path / "sdxl.safetensors")
    assert loaded.info["version"] == ("xl-refiner" if refiner else "xl") and loaded.refiner == refiner
    assert loaded.info["force_zeros_for_empty_prompt"] != refiner
    assert loaded.info["requires_aesthetics_score"] == refiner
    assert loaded.scheduler["timestep_spacing"] == "leading" and loaded.vae.config.scaling_factor == 0.13025
    for name in parts:
        assert_same(state_dicts({name: getattr(loaded, name)})[name], parts[name])
    assert loaded.tokenizer_2.pad_token_id == 0
    assert refiner or loaded.tokenizer.pad_token_id == 49407
    time_ids = loaded.micro_conditioning(64, 96).time_ids(1)
    assert time_ids.tolist() == [[64, 96, 0, 0, 6.0] if refiner else [64, 96, 0, 0, 64, 96]]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    context = torch.randn(1, 7, loaded.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, 48), "time_ids": time_ids}
    expected = models["unet"](x, 10, context, added_cond_kwargs=added).sample
    assert (loaded.unet(x, 10, context, **added) - expected).abs().max() <= 1e-5

    ckpt = load_checkpoint(tmp_path / "sdxl.safetensors")
    save_single_file(ckpt, tmp_path / "again.safetensors")
    assert_same(load_state_dict(tmp_path / "again.safetensors"), original)
    again = load_checkpoint(tmp_path / "again.safetensors")
    assert again.configs == ckpt.configs and again.info["version"] == ckpt.info["version"]


@torch.no_grad()
def test_diffusers_folder_loads_both_ways(tmp_path):
    models = full_parts()
    folder = str(clip_tokenizer_dir())
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")
    pipe = diffusers.StableDiffusionXLPipeline(**models, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                               scheduler=diffusers.EulerDiscreteScheduler(timestep_spacing="leading"))
    pipe.save_pretrained(tmp_path / "theirs")
    loaded = load_sdxl(tmp_path / "theirs")
    parts = state_dicts(models)
    for name in parts:
        assert_same(state_dicts({name: getattr(loaded, name)})[name], parts[name])
    assert loaded.info["version"] == "xl" and loaded.info["force_zeros_for_empty_prompt"]
    assert torch.equal(loaded.tokenizer_2(PROMPTS), tokenizer_2(PROMPTS, padding="max_length", max_length=77,
                                                                  return_tensors="pt").input_ids)
    assert torch.equal(loaded.tokenizer(PROMPTS), tokenizer(PROMPTS, padding="max_length", max_length=77,
                                                              return_tensors="pt").input_ids)
    ckpt = load_checkpoint(tmp_path / "theirs")
    save_diffusers(ckpt, tmp_path / "ours")                          # our save -> their load
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "ours")
    for name in parts:
        assert_same(state_dicts({name: getattr(theirs, name)})[name], parts[name])
    assert theirs.tokenizer_2.pad_token == "!" and theirs.config.force_zeros_for_empty_prompt


@pytest.mark.parametrize("fp16_fix", [False, True], ids=["sdxl_vae", "fp16_fix"])
def test_vae_configs_build_diffusers_shapes(fp16_fix):
    config = vae_config(fp16_fix=fp16_fix)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL.from_config(config)
        ours = AutoencoderKL(VAEConfig.from_dict(config))
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in reference.state_dict().items()})
    assert reference.config.scaling_factor == ours.config.scaling_factor == 0.13025
    assert reference.config.force_upcast != fp16_fix


# ---- The whole pipeline: `nanodiff generate --model DIR` on an SDXL folder = StableDiffusionXLPipeline ----

def saved_pipeline(pipeline_cls, parts: dict, path):
    """A tiny SDXL pipeline of `pipeline_cls` from `parts` (full_parts) with both tokenizers, saved by diffusers
    (save_pretrained) at `path`: the pipeline object."""
    folder = str(clip_tokenizer_dir())
    pipe = pipeline_cls(
        **parts, tokenizer=transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!"),
        scheduler=diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1))
    pipe.save_pretrained(path)
    return pipe


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """A tiny SDXL pipeline saved by diffusers (save_pretrained), and the pipeline object that saved it."""
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    return path, saved_pipeline(diffusers.StableDiffusionXLPipeline, full_parts(), path)


@pytest.mark.parametrize("sampler, scheduler", [("euler", "EulerDiscreteScheduler"),
                                                ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_sdxl_txt2img_matches_diffusers(sdxl_folder, sampler, scheduler):
    """Default negative prompt (diffusers: None -> zeros), CFG 5, 64 x 64, 3 steps: the same image to 2/255."""
    from nanodiffusion.pipeline import Pipeline

    path, reference = sdxl_folder
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    expected = reference(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                         generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    pipe = Pipeline.load(path, precision="float32")
    assert pipe.is_sdxl and pipe.default_size == pipe.unet.config.sample_size * pipe.vae_scale
    image = pipe(PROMPTS[0], steps=3, cfg=5.0, width=64, height=64, seed=7, sampler=sampler)[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert float(torch.from_numpy(expected).float().std()) > 0.01   # not a flat image
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255


@pytest.fixture(scope="module")
def refiner_folder(sdxl_folder, tmp_path_factory):
    """A tiny SDXL refiner (bigG alone, aesthetic-score time ids) saved by diffusers, sharing the base's VAE as the
    published refiner does, and the img2img pipeline that saved it."""
    _, base = sdxl_folder
    models = full_parts(refiner=True)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        **{**models, "vae": base.vae}, text_encoder=None, tokenizer=None, tokenizer_2=base.tokenizer_2,
        scheduler=diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    path = tmp_path_factory.mktemp("refiner") / "tiny-refiner"
    refiner.save_pretrained(path)
    return path, refiner


def test_sdxl_refiner_alone_refines_but_does_not_start(refiner_folder):
    """The refiner loads (bigG only, aesthetic score 6 / 2.5) and runs img2img as diffusers' refiner pipeline does;
    txt2img with it is one clear line."""
    from PIL import Image

    from nanodiffusion.pipeline import Pipeline

    path, reference = refiner_folder
    pipe = Pipeline.load(path, precision="float32")
    assert pipe.is_refiner and pipe.aesthetic_score == 6.0
    with pytest.raises(NanoDiffusionError, match="SDXL refiner"):
        pipe(PROMPTS[0], steps=3, width=64, height=64)
    init = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    expected = reference(PROMPTS[1], image=init, strength=0.5, num_inference_steps=4, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    image = pipe(PROMPTS[1], init_image=init, strength=0.5, steps=4, cfg=5.0, seed=2, sampler="euler", width=64,
                 height=64)[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255


@pytest.mark.parametrize("sampler, scheduler, switch", [("euler", "EulerDiscreteScheduler", 0.8),
                                                        ("dpmpp_2m", "DPMSolverMultistepScheduler", 0.6)])
def test_base_to_refiner_handoff_matches_diffusers(sdxl_folder, refiner_folder, sampler, scheduler, switch):
    """The ensemble of experts (Podell et al. 2023 §2.5): the base denoises to denoising_end, its latents go to the
    refiner at denoising_start, as diffusers' documented base + refiner recipe; 6 steps, CFG 5, to 2/255."""
    from nanodiffusion.pipeline import Pipeline

    (base_path, base), (refiner_path, refiner) = sdxl_folder, refiner_folder
    base.scheduler = getattr(diffusers, scheduler).from_config(base.scheduler.config)
    refiner.scheduler = getattr(diffusers, scheduler).from_config(refiner.scheduler.config)
    latents = base(PROMPTS[0], num_inference_steps=6, guidance_scale=5.0, height=64, width=64,
                   denoising_end=switch, generator=torch.Generator().manual_seed(5), output_type="latent").images
    expected = refiner(PROMPTS[0], image=latents, num_inference_steps=6, guidance_scale=5.0, denoising_start=switch,
                       generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    pipe, pipe_refiner = Pipeline.load(base_path, precision="float32"), Pipeline.load(refiner_path, precision="float32")
    image = pipe(PROMPTS[0], steps=6, cfg=5.0, width=64, height=64, seed=5, sampler=sampler, refiner=pipe_refiner,
                 refiner_switch_at=switch)[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert float(torch.from_numpy(expected).float().std()) > 0.01
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255
    assert "Refiner: tiny-refiner" in image.info["parameters"] and f"Refiner switch at: {switch}" in image.info[
        "parameters"]


def test_cli_refiner_flags_give_the_pipeline_image(sdxl_folder, refiner_folder, tmp_path):
    """`nanodiff generate --model BASE --refiner REFINER --refiner-switch-at 0.7` = the Python API's image."""
    from PIL import Image

    from nanodiffusion.cli import main
    from nanodiffusion.pipeline import Pipeline

    base, refiner = sdxl_folder[0], refiner_folder[0]
    out = tmp_path / "refined.png"
    assert main(["generate", PROMPTS[1], "--model", str(base), "--refiner", str(refiner), "--refiner-switch-at",
                 "0.7", "--steps", "5", "--cfg", "4", "-W", "64", "-H", "64", "--seed", "9", "--sampler", "euler",
                 "--precision", "float32", "-o", str(out)]) == 0
    expected = Pipeline.load(base, precision="float32")(
        PROMPTS[1], steps=5, cfg=4.0, width=64, height=64, seed=9, sampler="euler",
        refiner=Pipeline.load(refiner, precision="float32"), refiner_switch_at=0.7)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_api_refiner_fields_give_the_pipeline_image(sdxl_folder, refiner_folder, tmp_path):
    """The web UI API's refiner_checkpoint / refiner_switch_at (a checkpoint of --models-dir) = the Python API's
    hand-off, with the refiner in the image's parameters; an unknown refiner is a 422 naming the choices."""
    import base64
    import io
    import json
    import shutil

    from fastapi.testclient import TestClient
    from PIL import Image

    from nanodiffusion.pipeline import Pipeline
    from nanodiffusion.server.app import create_app

    base, refiner = sdxl_folder[0], refiner_folder[0]
    shutil.copytree(refiner, tmp_path / "models" / "tiny-refiner")

    def load(path):
        return Pipeline.load(path, precision="float32")

    app = create_app(load(base), outputs=tmp_path / "out", model_path=base, models_dir=tmp_path / "models",
                     loader=load)
    body = dict(prompt=PROMPTS[1], steps=5, cfg_scale=4, width=64, height=64, seed=9, sampler_name="Euler",
                refiner_checkpoint="tiny-refiner", refiner_switch_at=0.7)
    with TestClient(app) as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB")
        infotext = json.loads(response.json()["info"])["infotexts"][0]
        unknown = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "no-such-refiner"})
    expected = load(base)(PROMPTS[1], steps=5, cfg=4.0, width=64, height=64, seed=9, sampler="euler",
                          refiner=load(refiner), refiner_switch_at=0.7)[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert "Refiner: tiny-refiner" in infotext and "Refiner switch at: 0.7" in infotext
    assert unknown.status_code == 422 and "no-such-refiner" in unknown.text and "tiny-refiner" in unknown.text


def test_refiner_errors_are_one_line(sdxl_folder, refiner_folder):
    from PIL import Image

    from nanodiffusion.pipeline import Pipeline

    pipe, refiner = Pipeline.load(sdxl_folder[0]), Pipeline.load(refiner_folder[0])
    for bad, match in ((dict(refiner=refiner, refiner_switch_at=1.0), "refiner_switch_at 1.0"),
                       (dict(refiner=refiner, refiner_switch_at=0.05), "leaves no steps to the base model"),
                       (dict(refiner=refiner, refiner_switch_at=0.999), "leaves no steps to the refiner"),
                       (dict(refiner=pipe.__class__.load()), "another latent space")):
        with pytest.raises(NanoDiffusionError, match=match):
            pipe(PROMPTS[0], steps=4, width=64, height=64, **bad)
    with pytest.raises(NanoDiffusionError, match="itself a refiner"):
        refiner(PROMPTS[0], steps=4, width=64, height=64, refiner=refiner,
                init_image=Image.new("RGB", (64, 64)))


def test_sdxl_img2img_matches_diffusers(sdxl_folder):
    """StableDiffusionXLImg2ImgPipeline on the same folder: strength 0.6, Euler, 4 steps, to 2/255."""
    from PIL import Image

    from nanodiffusion.pipeline import Pipeline

    path, _ = sdxl_folder
    init = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = reference(PROMPTS[1], image=init, strength=0.6, num_inference_steps=4, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    image = Pipeline.load(path, precision="float32")(PROMPTS[1], init_image=init, strength=0.6, steps=4, cfg=5.0,
                                                      seed=3, sampler="euler", width=64, height=64)[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    """A tiny SDXL inpainting pipeline (9-channel UNet) saved by diffusers, as the published SDXL inpainting
    folder is laid out."""
    path = tmp_path_factory.mktemp("sdxl-inpaint") / "tiny-sdxl-inpaint"
    saved_pipeline(diffusers.StableDiffusionXLInpaintPipeline, full_parts(in_channels=9), path)
    return path


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sdxl_inpainting_matches_diffusers(inpaint_folder, tmp_path, strength):
    """StableDiffusionXLInpaintPipeline: the 9-channel UNet sees the mask and the masked image's latents beside the
    SDXL conditioning; the same image to 2/255 from the diffusers folder and from its single file."""
    from PIL import Image

    from nanodiffusion.pipeline import Pipeline

    init = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    reference = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(inpaint_folder)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPTS[1], image=init, mask_image=mask, strength=strength, num_inference_steps=4,
                         guidance_scale=5.0, height=64, width=64, generator=torch.Generator().manual_seed(5),
                         output_type="np").images[0]
    assert float(torch.from_numpy(expected).float().std()) > 0.01
    save_single_file(load_checkpoint(inpaint_folder), tmp_path / "inpaint.safetensors")
    for source in (inpaint_folder, tmp_path / "inpaint.safetensors"):
        pipe = Pipeline.load(source, precision="float32")
        assert pipe.is_sdxl and pipe.is_inpainting_model
        image = pipe(PROMPTS[1], init_image=init, mask=mask, strength=strength, steps=4, cfg=5.0, seed=5,
                     sampler="euler", width=64, height=64)[0]
        ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
        assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255, source


def test_sdxl_controlnet_matches_diffusers(sdxl_folder, tmp_path):
    """An SDXL ControlNet (the encoder copied with its added conditioning, text_embeds / time_ids fed to both
    networks) from a diffusers folder, a diffusers-named single file and an original-layout single file gives
    StableDiffusionXLControlNetPipeline's image to 2/255; without it the image differs."""
    from PIL import Image

    from nanodiffusion.controlnet_files import diffusers_to_original, load_controlnet
    from nanodiffusion.pipeline import Pipeline

    path, base = sdxl_folder
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    randomize_zero_layers(controlnet)
    g = torch.Generator().manual_seed(3)
    controlnet.eval().save_pretrained(tmp_path / "controlnet")
    sd = controlnet.state_dict()
    save_file(sd, tmp_path / "diffusers-names.safetensors")
    save_file(diffusers_to_original(sd), tmp_path / "original.safetensors")
    assert "control_model.label_emb.0.0.weight" in diffusers_to_original(sd)

    control = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
    reference = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(path, controlnet=controlnet)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPTS[0], image=control, controlnet_conditioning_scale=0.7, num_inference_steps=3,
                         guidance_scale=5.0, height=64, width=64, generator=torch.Generator().manual_seed(7),
                         output_type="np").images[0]
    pipe = Pipeline.load(path, precision="float32")
    kw = dict(steps=3, cfg=5.0, width=64, height=64, seed=7, sampler="euler")
    plain = torch.tensor(np.asarray(pipe(PROMPTS[0], **kw)[0]), dtype=torch.float32) / 255
    assert (plain - torch.from_numpy(expected)).abs().max() > 4 / 255
    for source in ("controlnet", "diffusers-names.safetensors", "original.safetensors"):
        pipe.controlnet = load_controlnet(tmp_path / source)
        assert pipe.controlnet.config.addition_embed_type == "text_time"
        image = pipe(PROMPTS[0], control_image=control, control_scale=0.7, **kw)[0]
        ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
        assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255, source
