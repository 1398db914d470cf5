"""SD3 / SD3.5 networks against diffusers and transformers: same random weights (loaded with strict=True), same
inputs -> same outputs. MMDiT (plain, QK RMSNorm, dual attention), T5 encoder and tokenizer, the 16-channel VAE
with its shift, and the shifted rectified-flow schedule stepped by our Euler against FlowMatchEulerDiscreteScheduler;
then the whole txt2img pipeline on a tiny StableDiffusion3Pipeline folder, with and without T5; and Stability's single
files (MMDiT, VAE, CLIP-L / CLIP-G / T5 in one .safetensors): our layout = diffusers' converter, the file = the
folder, round trips exact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanodiffusion.checkpoints import describe
from nanodiffusion.denoisers import Denoiser
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.flow_schedule import FlowSchedule, step_from_noise
from nanodiffusion.models.mmdit import MMDiTConfig, SD3Transformer2DModel
from nanodiffusion.models.t5 import T5Config, T5EncoderModel, T5Tokenizer
from nanodiffusion.models.vae import AutoencoderKL, VAEConfig
from nanodiffusion.samplers import sample_euler
from oracles import clip_tokenizer_dir, require

TINY_MMDIT = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
                  out_channels=4, pos_embed_max_size=12)
MMDIT_CASES = {"sd3": {}, "sd35_qk_norm": {"qk_norm": "rms_norm"},
               "sd35_medium_dual": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}}
TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=16, relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
SD3_VAE = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=32, latent_channels=16,
               use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)


def randomise(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Random weights everywhere (adaLN-Zero and output layers start at zero; the positions are a buffer)."""
    torch.manual_seed(seed)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():   # not the text encoders' position ids
            tensor.data.normal_(0, std)


@pytest.mark.parametrize("kw", MMDIT_CASES.values(), ids=MMDIT_CASES.keys())
@torch.no_grad()
def test_mmdit_matches_diffusers(kw):
    diffusers = require("diffusers")
    reference = diffusers.SD3Transformer2DModel(**TINY_MMDIT, **kw).eval()
    randomise(reference)
    ours = SD3Transformer2DModel(MMDiTConfig.from_dict(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 10, 14, generator=g), torch.randn(2, 7, 24, generator=g)
    pooled = torch.randn(2, 20, generator=g)
    t = torch.tensor([1000.0, 312.5])
    expected = reference(x, text, pooled, t).sample
    assert (ours(x, t, text, pooled) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", MMDIT_CASES.values(), ids=MMDIT_CASES.keys())
@torch.no_grad()
def test_mmdit_in_bfloat16_computes_its_blocks_in_bfloat16_and_stays_close(kw):
    """Under precision.compute_in(bfloat16) every block's output is bfloat16 (the float32 conditioning vector is
    cast to the blocks' dtype, so modulation does not bring the activations back to float32) and the velocity stays
    close to float32's."""
    from nanodiffusion.precision import compute_in

    model = SD3Transformer2DModel(MMDiTConfig.from_dict({**TINY_MMDIT, **kw})).eval()
    randomise(model)
    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(2, 4, 10, 14, generator=g), torch.randn(2, 7, 24, generator=g), torch.randn(2, 20)
    t = torch.tensor([1000.0, 312.5])
    expected = model(x, t, text, pooled)
    compute_in(model, torch.bfloat16, keep_args=(1,))
    dtypes = []
    for block in model.transformer_blocks:
        block.register_forward_hook(lambda _, __, out: dtypes.extend(o.dtype for o in out if o is not None))
    out = model(x, t, text, pooled)
    assert set(dtypes) == {torch.bfloat16} and out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_mmdit_config_defaults_keys_older_configs_lack_and_rejects_bad_sizes():
    older = TINY_MMDIT | {"out_channels": None, "_class_name": "SD3Transformer2DModel"}
    config = MMDiTConfig.from_dict(older)
    assert config.qk_norm is None and config.dual_attention_layers == [] and config.out_channels == 4
    model = SD3Transformer2DModel(config)
    with pytest.raises(NanoDiffusionError, match="position grid"):
        model(torch.zeros(1, 4, 26, 8), 500.0, torch.zeros(1, 3, 24), torch.zeros(1, 20))
    with pytest.raises(NanoDiffusionError, match="multiple of the patch size"):
        model(torch.zeros(1, 4, 9, 8), 500.0, torch.zeros(1, 3, 24), torch.zeros(1, 20))
    with pytest.raises(NanoDiffusionError, match="caption_projection_dim"):
        SD3Transformer2DModel(MMDiTConfig.from_dict(TINY_MMDIT | {"caption_projection_dim": 16}))


@torch.no_grad()
def test_t5_encoder_matches_transformers_from_state_dict_and_saved_file(tmp_path):
    transformers = require("transformers")
    reference = transformers.T5EncoderModel(transformers.T5Config(**TINY_T5)).eval()
    randomise(reference, 0.3)
    reference.save_pretrained(tmp_path)   # the file keeps shared.weight only (embed_tokens is tied to it)
    ours = T5EncoderModel(T5Config.from_dict(reference.config.to_dict())).eval()
    ours.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))   # past max_distance 20
    expected = reference(input_ids=ids).last_hidden_state
    assert (ours(ids) - expected).abs().max() <= 1e-5


def test_t5_tokenizer_matches_transformers(tmp_path):
    transformers = require("transformers")
    words = ["▁a", "▁red", "▁circle", "▁above", "▁blue", "▁square", "▁cat", "s", "ing", "▁the"]
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    letters = [(c, -8.0) for c in alphabet] + [("▁" + c, -7.0) for c in alphabet]
    pieces = [(w, -3.0 - i / 10) for i, w in enumerate(words)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *pieces, *letters]
    reference = transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)
    reference.save_pretrained(tmp_path / "tokenizer_3")
    ours = T5Tokenizer.from_folder(tmp_path, model_max_length=12)
    prompts = ["a red circle above a blue square", "cats singing", "", "the quick brown fox jumps over the lazy dog!"]
    expected = reference(prompts, padding="max_length", max_length=12, truncation=True,
                         add_special_tokens=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), expected)
    assert ours("a red circle")[0, 3].item() == reference.eos_token_id
    with pytest.raises(NanoDiffusionError, match="tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path / "missing")


@torch.no_grad()
def test_sd3_vae_matches_diffusers_and_shifts_latents():
    diffusers = require("diffusers")
    config = VAEConfig(**SD3_VAE)
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL.from_config(config.to_dict()).eval()
    assert VAEConfig.from_dict(dict(reference.config)) == config
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert ours.quant_conv is None and ours.post_quant_conv is None
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = ours.encode(x).mean
    assert z.shape == (1, 16, 16, 16)
    assert (z - reference.encode(x).latent_dist.mean).abs().max() <= 1e-5
    latents = ours.scale_latents(z)
    assert torch.allclose(latents, (z - 0.0609) * 1.5305)
    assert torch.allclose(ours.unscale_latents(latents), z, atol=1e-6)
    assert (ours.decode(z) - reference.decode(z).sample).abs().max() <= 1e-5


def flow_scheduler(shift: float = 3.0):
    diffusers = require("diffusers")
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_sigmas_match_flow_match_euler(steps, shift):
    reference = flow_scheduler(shift)
    reference.set_timesteps(steps)
    schedule = FlowSchedule.from_config(dict(reference.config))
    sigmas = schedule.sigmas(steps)
    assert math.isinf(sigmas[0]) and sigmas[-1] == 0 and len(sigmas) == steps + 1
    t = sigmas / (1 + sigmas)
    t[0] = 1.0
    assert (t - reference.sigmas.double()).abs().max() <= 1e-6
    assert (schedule.sigma_to_t(sigmas[:-1]) / 1000 - reference.timesteps.double() / 1000).abs().max() <= 1e-6


def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a flow network: v depends on x and on the timestep 1000 t."""
    t = (timestep / 1000).reshape(-1, 1, 1, 1)
    return 0.7 * x * torch.cos(3 * t) - torch.sin(5 * t) + 0.1 * x.roll(1, dims=-1)


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 3e-6)], ids=["fp64", "fp32"])
def test_flow_euler_reproduces_flow_match_euler_step_by_step(steps, dtype, tolerance):
    """Our Euler in float64 is within diffusers' own float32 rounding; in float32 the variance-exploding x (up to
    ~25x the flow sample at the first steps) adds about one float32 ulp of the sample per step."""
    reference = flow_scheduler(3.0)
    reference.set_timesteps(steps)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    expected = [x := noise]
    for timestep in reference.timesteps:
        x = reference.step(velocity(x, timestep.expand(2)), timestep, x).prev_sample
        expected.append(x)
    schedule = FlowSchedule(shift=3.0)
    sigmas = schedule.sigmas(steps)
    denoiser = Denoiser(velocity, schedule)
    x, x0 = step_from_noise(denoiser, noise.to(dtype), float(sigmas[1]))
    assert (x0.float() - (noise - velocity(noise, torch.tensor([1000.0, 1000.0])))).abs().max() <= 1e-6
    got = [noise, x / (1 + sigmas[1])]
    sample_euler(denoiser, x, sigmas[1:], callback=lambda i, s, x, _: got.append(x / (1 + sigmas[i + 2])))
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        assert (ours.float() - theirs).abs().max() <= tolerance


def test_flow_schedule_rejects_settings_it_does_not_follow():
    with pytest.raises(NanoDiffusionError, match="use_dynamic_shifting"):
        FlowSchedule.from_config({"shift": 3.0, "use_dynamic_shifting": True})
    with pytest.raises(NanoDiffusionError, match="sigma schedule"):
        FlowSchedule(shift=3.0).sigmas(4, "karras")
    with pytest.raises(NanoDiffusionError, match="shift"):
        FlowSchedule(shift=0.0)


# ---- The whole pipeline: Pipeline.load(DIR) on an SD3 folder = StableDiffusion3Pipeline ----

PROMPT = "a red circle above a blue square"
STD, TEXT_STD = 0.2, 0.3   # weights this large make every text input move the image far beyond 2/255


def t5_tokenizer(transformers):
    """A tiny SentencePiece-style T5 tokenizer (tokenizer.json), as test_t5_tokenizer_matches_transformers builds."""
    words = ["▁a", "▁red", "▁circle", "▁above", "▁blue", "▁square"]
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    letters = [(c, -8.0) for c in alphabet] + [("▁" + c, -7.0) for c in alphabet]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
             *[(w, -3.0 - i / 10) for i, w in enumerate(words)], *letters]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0)


# Sizes of the tiny pipelines: TINY's heads are 8 wide; a single file without metadata is read with the published
# models' sizes that are not in its shapes (64-wide heads, T5's maximum distance 128, 32 norm groups): INFERABLE's.
TINY = dict(head_dim=8, heads=4, clip_width=16, t5_distance=20, vae_groups=8)
INFERABLE = dict(head_dim=64, heads=2, clip_width=64, t5_distance=128, vae_groups=32)


def sd3_parts(diffusers, transformers, t5: bool, sizes: dict = TINY, **mmdit) -> dict:
    """Tiny SD3 networks built by diffusers / transformers: MMDiT (joint width 2 x the CLIP width, `mmdit`: its extra
    settings), 16-channel VAE, CLIP-L and CLIP-G with projections (pooled 24 + 40), T5 (d_model the joint width) or
    None, and the pipeline's tokenizers."""
    torch.manual_seed(5)
    width, joint, inner = sizes["clip_width"], 2 * sizes["clip_width"], sizes["heads"] * sizes["head_dim"]
    clip = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=width // sizes["head_dim"], max_position_embeddings=77, bos_token_id=0,
                eos_token_id=2, pad_token_id=1)
    folder = str(clip_tokenizer_dir())
    transformer = diffusers.SD3Transformer2DModel(**{
        "sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": sizes["head_dim"],
        "num_attention_heads": sizes["heads"], "joint_attention_dim": joint, "caption_projection_dim": inner,
        "pooled_projection_dim": 64, "out_channels": 16, "pos_embed_max_size": 16, **mmdit})
    t5_config = {**TINY_T5, "vocab_size": 80, "d_model": joint, "relative_attention_max_distance": sizes["t5_distance"]}
    text_encoders = {
        "text_encoder": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            **clip, hidden_act="quick_gelu", projection_dim=24)),
        "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            **clip, hidden_act="gelu", projection_dim=40)),
        "text_encoder_3": transformers.T5EncoderModel(transformers.T5Config(**t5_config)) if t5 else None}
    for seed, (model, std) in enumerate([(transformer, STD), *((m, TEXT_STD) for m in text_encoders.values() if m)]):
        randomise(model, std, seed)
    return {
        "transformer": transformer.eval(),
        "vae": diffusers.AutoencoderKL(**{**SD3_VAE, "norm_num_groups": sizes["vae_groups"]}).eval(),
        **{name: model and model.eval() for name, model in text_encoders.items()},
        "tokenizer": transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77),
        "tokenizer_2": transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!"),
        "tokenizer_3": t5_tokenizer(transformers) if t5 else None,
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)}


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "without_t5"])
def sd3_folder(request, tmp_path_factory):
    """A tiny SD3 pipeline saved by diffusers (save_pretrained; without T5: text_encoder_3 None), and the pipeline."""
    diffusers, transformers = require("diffusers"), require("transformers")
    pipe = diffusers.StableDiffusion3Pipeline(**sd3_parts(diffusers, transformers, request.param))
    path = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    pipe.save_pretrained(path)
    return path, pipe


def test_sd3_txt2img_matches_diffusers(sd3_folder):
    """Default negative prompt (diffusers encodes ""), CFG 5, 64 x 64, 4 flow Euler steps: the same image to 2/255."""
    from nanodiffusion.pipeline import Pipeline

    path, reference = sd3_folder
    expected = reference(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                         generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    pipe = Pipeline.load(path, precision="float32")
    assert pipe.is_sd3 and not pipe.is_sdxl and pipe.prediction == "flow"
    assert (pipe.text_encoder_3 is None) == (reference.text_encoder_3 is None)
    with torch.no_grad():
        context, negative, pooled, negative_pooled = reference.encode_prompt(PROMPT, None, None)
        cond, uncond = pipe.encode_text([PROMPT], [""], clip_skip=1)
    for ours_, theirs in [(cond["context"], context), (uncond["context"], negative),
                          (cond["pooled_projections"], pooled), (uncond["pooled_projections"], negative_pooled)]:
        assert ours_.shape == theirs.shape and (ours_ - theirs).abs().max() <= 1e-5
    image = pipe(PROMPT, steps=4, cfg=5.0, width=64, height=64, seed=7, sampler="euler")[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert float(torch.from_numpy(expected).float().std()) > 0.01   # not a flat image
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255


@pytest.mark.parametrize("steps, strength", [(5, 0.6), (4, 0.7)])
def test_sd3_img2img_matches_diffusers(sd3_folder, steps, strength):
    """StableDiffusion3Img2ImgPipeline on the same folder: the init image's latents noised to the flow sigma that
    the strength selects (x = (1 - s) x0 + s n; diffusers skips int(steps - steps * strength) steps), flow Euler."""
    from PIL import Image

    from nanodiffusion.pipeline import Pipeline

    path, txt2img = sd3_folder
    diffusers = require("diffusers")
    init = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    reference = diffusers.StableDiffusion3Img2ImgPipeline.from_pipe(txt2img)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, image=init, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    image = Pipeline.load(path, precision="float32")(PROMPT, init_image=init, strength=strength, steps=steps,
                                                      cfg=5.0, seed=3, sampler="euler", width=64, height=64)[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255


def test_sd3_info_and_t5_choice_runs_without_it_or_is_one_clear_line(sd3_folder):
    """`nanodiff info` names the family; t5=False on a folder with T5 = diffusers with text_encoder_3 None; t5=True
    without T5 (or on SD) is one line."""
    from nanodiffusion.pipeline import Pipeline

    path, reference = sd3_folder
    info = describe(path)   # nanodiff info
    assert info["version"] == "sd3" and info["prediction"] == "flow" and "transformer" in info["parameters"]
    with pytest.raises(NanoDiffusionError, match="^builtin is not an SD3 model"):
        Pipeline.load(None, t5=True)
    if reference.text_encoder_3 is None:
        with pytest.raises(NanoDiffusionError, match=r"^tiny-sd3 has no T5 text encoder \(no text_encoder_3/\)"):
            Pipeline.load(path, t5=True)
        return
    pipe = Pipeline.load(path, precision="float32", t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    without = type(reference)(**{**reference.components, "text_encoder_3": None, "tokenizer_3": None})
    expected = without(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                       generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    image = pipe(PROMPT, steps=3, cfg=5.0, width=64, height=64, seed=2, sampler="euler")[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255


def test_cli_t5_flags(sd3_folder, tmp_path, capsys):
    """`nanodiff generate --model SD3 --no-t5` = Pipeline.load(t5=False); `--t5` on a folder without T5 is one line."""
    from PIL import Image

    from nanodiffusion.cli import main
    from nanodiffusion.pipeline import Pipeline

    path, reference = sd3_folder
    args = ["generate", PROMPT, "--model", str(path), "--steps", "2", "-W", "64", "-H", "64", "--seed", "4",
            "--sampler", "euler", "--precision", "float32", "-o", str(tmp_path / "out.png")]
    if reference.text_encoder_3 is None:
        assert main([*args, "--t5"]) == 2
        assert capsys.readouterr().err.startswith("error: tiny-sd3 has no T5 text encoder")
        return
    assert main([*args, "--no-t5"]) == 0
    expected = Pipeline.load(path, precision="float32", t5=False)(PROMPT, steps=2, width=64, height=64, seed=4,
                                                                   sampler="euler")[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(expected))


# ---- Single files as Stability publishes them (model.diffusion_model.joint_blocks, first_stage_model.,
# text_encoders.clip_l / clip_g / t5xxl): our layout = diffusers' converter; loads = the folder; round trips exact ----

def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A network's tensors as files store them (without transformers' position_ids buffer, and T5's embed_tokens, the
    tied copy of shared.weight)."""
    return {k: t for k, t in model.state_dict().items()
            if not k.endswith("position_ids") and k != "encoder.embed_tokens.weight"}


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("kw", MMDIT_CASES.values(), ids=MMDIT_CASES.keys())
def test_single_file_layout_matches_diffusers_converter(kw):
    """Our original layout, read back by diffusers' own converters, gives the same state dicts; the MMDiT config
    inferred from it is the model's."""
    diffusers, transformers = require("diffusers"), require("transformers")
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    from nanodiffusion.checkpoint_keys import diffusers_to_original, original_to_diffusers
    from nanodiffusion.checkpoint_configs import infer_config

    models = sd3_parts(diffusers, transformers, True, INFERABLE, num_layers=3, **kw)
    parts = {name: state_dict(models[name]) for name in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                         "text_encoder_3")}
    original = diffusers_to_original(parts)
    block, last = "model.diffusion_model.joint_blocks.0.", "model.diffusion_model.joint_blocks.2.context_block."
    assert f"{block}x_block.attn.qkv.weight" in original and f"{block}context_block.attn.proj.weight" in original
    assert f"{last}attn.qkv.weight" in original and f"{last}attn.proj.weight" not in original   # pre-only
    assert (f"{block}x_block.attn.ln_q.weight" in original) == ("qk_norm" in kw)
    assert (f"{block}x_block.attn2.qkv.weight" in original) == ("dual_attention_layers" in kw)
    mmdit = {k: t for k, t in original.items() if k.startswith("model.diffusion_model.")}
    assert_same(convert_sd3_transformer_checkpoint_to_diffusers(mmdit), parts["transformer"])
    assert_same(convert_ldm_vae_checkpoint(original, dict(models["vae"].config)), parts["vae"])
    for name, prefix in [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")]:
        got = {k: t for k, t in convert_ldm_clip_checkpoint(original, f"text_encoders.{prefix}.transformer.").items()
               if k.startswith(("text_model.", "text_projection.", "shared.", "encoder."))}
        assert_same(got, parts[name])
    back = original_to_diffusers(original)
    for name in parts:
        assert_same(back[name], parts[name])
    inferred = {k: v for k, v in infer_config("transformer", back["transformer"], "sd3").items() if k != "_class_name"}
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in models["transformer"].config.items()}
    assert inferred == {k: expected[k] for k in inferred}
    ours = SD3Transformer2DModel(MMDiTConfig.from_dict(inferred)).eval()
    ours.load_state_dict(back["transformer"], strict=True)
    x, text, pooled = torch.randn(1, 16, 8, 8), torch.randn(1, 5, 128), torch.randn(1, 64)
    with torch.no_grad():
        reference = models["transformer"](x, text, pooled, torch.tensor([500.0])).sample
        assert (ours(x, torch.tensor([500.0]), text, pooled) - reference).abs().max() <= 1e-5


def test_clip_l_projection_absent_from_stability_files_is_the_identity():
    """Stability's files leave out CLIP-L's text_projection (SD3 does not project CLIP-L's pooled output): it reads
    as the identity, and an identity projection is left out again when written."""
    from nanodiffusion.checkpoint_keys import sd3_clip_to_transformers, transformers_to_sd3_clip

    sd = {"text_model.final_layer_norm.weight": torch.ones(6), "text_model.final_layer_norm.bias": torch.zeros(6)}
    read = sd3_clip_to_transformers({**sd, "logit_scale": torch.tensor(4.6)})
    assert torch.equal(read["text_projection.weight"], torch.eye(6)) and "logit_scale" not in read
    assert_same(transformers_to_sd3_clip(read), sd)
    projected = {**sd, "text_projection.weight": torch.randn(4, 6)}
    assert_same(transformers_to_sd3_clip(sd3_clip_to_transformers(projected)), projected)


def test_t5_token_embedding_is_read_once_whichever_name_the_file_gives_it():
    from nanodiffusion.checkpoint_keys import t5_names

    embedding, norm = torch.randn(5, 4), torch.ones(4)
    for names in (["shared.weight"], ["encoder.embed_tokens.weight"], ["shared.weight", "encoder.embed_tokens.weight"]):
        sd = {**dict.fromkeys(names, embedding), "encoder.final_layer_norm.weight": norm}
        assert_same(t5_names(sd), {"shared.weight": embedding, "encoder.final_layer_norm.weight": norm})


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "without_t5"])
def sd3_file(request, tmp_path_factory):
    """A tiny SD3 pipeline (sizes a single file can tell) saved by diffusers as a folder, and the same weights as one
    published-style single file without metadata (T5's tokenizer in a tokenizer_3/ folder beside it)."""
    diffusers, transformers = require("diffusers"), require("transformers")
    from safetensors.torch import save_file

    from nanodiffusion.checkpoint_keys import diffusers_to_original
    from nanodiffusion.checkpoints import load_checkpoint

    models = sd3_parts(diffusers, transformers, request.param, INFERABLE)
    folder = tmp_path_factory.mktemp("sd3file") / "tiny-sd3"
    diffusers.StableDiffusion3Pipeline(**models).save_pretrained(folder)
    file = folder.parent / "files" / "tiny-sd3.safetensors"
    file.parent.mkdir()
    save_file(diffusers_to_original(load_checkpoint(folder).parts), file)   # T5's tied embedding once, as saved
    if request.param:
        import shutil
        shutil.copytree(folder / "tokenizer_3", file.parent / "tokenizer_3")
    return folder, file


def test_single_file_loads_as_the_folder_and_generates_its_image(sd3_file):
    """Pipeline.load(file) = Pipeline.load(folder): configs inferred from the shapes, the same image (1/255)."""
    from nanodiffusion.checkpoints import load_checkpoint
    from nanodiffusion.pipeline import Pipeline

    folder, file = sd3_file
    ckpt, reference = load_checkpoint(file), load_checkpoint(folder)
    assert ckpt.info["version"] == "sd3" and ckpt.info["prediction"] == "flow" and ckpt.info["inferred"]
    assert ckpt.parts.keys() == reference.parts.keys()
    for name in reference.parts:
        assert_same(ckpt.parts[name], reference.parts[name])
        inferred = {k: v for k, v in ckpt.configs[name].items() if not k.startswith("_")
                    and (name, k) != ("vae", "sample_size")}   # the published VAE's 1024, not the tiny one's
        assert inferred == {k: reference.configs[name][k] for k in inferred}
    assert ckpt.scheduler["shift"] == 3.0 and ckpt.configs["vae"]["shift_factor"] == 0.0609
    images = [Pipeline.load(path, precision="float32")(PROMPT, steps=3, cfg=5.0, width=64, height=64, seed=3,
                                                        sampler="euler")[0] for path in (folder, file)]
    ours, theirs = (torch.tensor(np.asarray(image), dtype=torch.float32) / 255 for image in images)
    assert float(theirs.std()) > 0.01 and (ours - theirs).abs().max() <= 1 / 255
    info = describe(file)   # nanodiff info
    assert info["version"] == "sd3" and info["prediction"] == "flow" and info["format"] == "safetensors"
    assert ("text_encoder_3" in info["parameters"]) == (folder / "text_encoder_3").is_dir()


def test_sd3_convert_round_trips_exactly(sd3_file, tmp_path):
    """folder -> single file -> folder and single file -> folder -> single file give back every tensor (and our own
    files their configs); diffusers loads the folder we write."""
    from nanodiffusion.checkpoints import convert, load_checkpoint, load_state_dict

    folder, file = sd3_file
    convert(folder, tmp_path / "from-folder.safetensors")
    convert(tmp_path / "from-folder.safetensors", tmp_path / "again")
    first, again = load_checkpoint(folder), load_checkpoint(tmp_path / "again")
    assert again.info["version"] == "sd3" and again.parts.keys() == first.parts.keys()
    for name in first.parts:
        assert_same(again.parts[name], first.parts[name])
        assert again.configs[name] == {**first.configs[name], **again.configs[name]}
    convert(file, tmp_path / "from-file")
    convert(tmp_path / "from-file", tmp_path / "back.safetensors")
    assert_same(load_state_dict(tmp_path / "back.safetensors"), load_state_dict(file))
    assert (tmp_path / "from-file" / "tokenizer_3").is_dir() == (folder / "text_encoder_3").is_dir()
    index = json.loads((tmp_path / "from-file" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    convert(folder, tmp_path / "ours")   # our save -> their load, with the folder's tokenizers
    without = {} if "text_encoder_3" in first.parts else {"text_encoder_3": None, "tokenizer_3": None}   # as diffusers
    theirs = require("diffusers").StableDiffusion3Pipeline.from_pretrained(tmp_path / "ours", **without)
    for name in first.parts:
        assert_same(state_dict(getattr(theirs, name)), first.parts[name])


def test_single_file_without_text_encoders_or_t5_tokenizer_is_one_clear_line(sd3_file, tmp_path):
    """sd3_medium.safetensors holds the MMDiT and VAE only: SD3 needs CLIP-L and CLIP-G. A file with T5 but no
    tokenizer_3/ beside it names both ways out; without T5 (--no-t5) it loads."""
    from safetensors.torch import save_file

    from nanodiffusion.checkpoints import load_state_dict
    from nanodiffusion.pipeline import Pipeline

    folder, file = sd3_file
    sd = load_state_dict(file)
    save_file({k: t for k, t in sd.items() if not k.startswith("text_encoders.")}, tmp_path / "sd3_medium.safetensors")
    with pytest.raises(NanoDiffusionError, match=r"^sd3_medium.safetensors has no CLIP-L \(text_encoders.clip_l.\), "
                                                 r"no CLIP-G \(text_encoders.clip_g.\): SD3 needs"):
        Pipeline.load(tmp_path / "sd3_medium.safetensors")
    if not (folder / "text_encoder_3").is_dir():
        with pytest.raises(NanoDiffusionError, match=r"no T5 text encoder \(no text_encoders.t5xxl.\)"):
            Pipeline.load(file, t5=True)
        return
    save_file(sd, tmp_path / "sd3_incl_t5.safetensors")
    with pytest.raises(NanoDiffusionError, match=r"^sd3_incl_t5.safetensors holds T5-XXL but no file holds its "
                                                 r"tokenizer: .*tokenizer_3/.*--no-t5"):
        Pipeline.load(tmp_path / "sd3_incl_t5.safetensors")
    assert Pipeline.load(tmp_path / "sd3_incl_t5.safetensors", t5=False).text_encoder_3 is None


@pytest.mark.parametrize("sd3_file", [True], ids=["t5"], indirect=True)   # the fp8 case needs T5
def test_half_precision_file_with_fp8_t5_loads_and_generates(sd3_file, tmp_path):
    """As sd3_medium_incl_clips_t5xxlfp8.safetensors: fp16 weights, T5's matrices in float8_e4m3fn (computed in
    float32 here); T5's tokenizer in tokenizer_3/ beside the file."""
    import shutil

    from safetensors.torch import save_file

    from nanodiffusion.checkpoints import load_state_dict
    from nanodiffusion.pipeline import Pipeline

    folder, file = sd3_file
    assert (folder / "text_encoder_3").is_dir()
    sd = {k: t.to(torch.float8_e4m3fn if k.startswith("text_encoders.t5xxl.") and t.ndim == 2 else torch.float16)
          for k, t in load_state_dict(file).items()}
    save_file(sd, tmp_path / "sd3_fp8.safetensors")
    shutil.copytree(file.parent / "tokenizer_3", tmp_path / "tokenizer_3")
    assert describe(tmp_path / "sd3_fp8.safetensors")["dtype"] == "float16"
    pipe = Pipeline.load(tmp_path / "sd3_fp8.safetensors", precision="float32")
    image = pipe(PROMPT, steps=2, cfg=5.0, width=64, height=64, seed=1, sampler="euler")[0]
    assert pipe.text_encoder_3 is not None and float(np.asarray(image, dtype=np.float32).std()) > 2


def meta_state_dict(model_cls, config) -> dict:
    """A network's state dict as shapes only (the meta device: no memory)."""
    with torch.device("meta"):
        return model_cls(config).state_dict()


def test_sd35_large_needs_more_than_24_gb_with_t5_and_says_so(monkeypatch):
    """SD 3.5 Large at its published sizes in bfloat16: MMDiT 8.1B + T5-XXL 4.8B + CLIP-G + CLIP-L weights do not fit
    a 24 GB machine (about 25 GB), without T5 they do (about 16.5 GB): loading says that in one line, before building."""
    from nanodiffusion import memory
    from nanodiffusion.models.clip import CLIPTextConfig, CLIPTextModelWithProjection

    clip = dict(vocab_size=49408, max_position_embeddings=77)
    parts = {
        "transformer": meta_state_dict(SD3Transformer2DModel, MMDiTConfig(
            num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
            qk_norm="rms_norm")),
        "text_encoder": meta_state_dict(CLIPTextModelWithProjection, CLIPTextConfig(
            **clip, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768)),
        "text_encoder_2": meta_state_dict(CLIPTextModelWithProjection, CLIPTextConfig(
            **clip, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280)),
        "text_encoder_3": meta_state_dict(T5EncoderModel, T5Config(
            d_model=4096, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))}
    need = memory.weights_bytes(parts, torch.bfloat16, torch.float32)
    assert 8.0e9 < need["transformer"] / 2 < 8.3e9 and 4.7e9 < need["text_encoder_3"] / 2 < 4.8e9
    monkeypatch.setattr(memory, "available_memory", lambda: 22 * memory.GB)   # a 24 GB machine, a little in use
    with pytest.raises(NanoDiffusionError) as error:
        memory.check_memory(parts, torch.bfloat16, torch.float32)
    message = str(error.value)
    assert "\n" not in message and "need about 25." in message and "22.0 GB free" in message
    assert "MMDiT 15." in message and "T5 encoder 8.9 GB" in message and "without T5 (--no-t5, t5=False: 16." in message
    parts.pop("text_encoder_3")
    memory.check_memory(parts, torch.bfloat16, torch.float32)   # fits
    with pytest.raises(NanoDiffusionError, match=r"compute in bfloat16 \(--precision bfloat16: 16\.\d GB\)"):
        memory.check_memory(parts, torch.float32, torch.float32)


def test_loading_a_model_too_big_for_free_memory_is_one_line(sd3_folder, monkeypatch):
    from nanodiffusion import memory
    from nanodiffusion.pipeline import Pipeline

    path, _ = sd3_folder
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    with pytest.raises(NanoDiffusionError, match=r"need about 0\.0 GB in float32 .* but this machine has 0\.0 GB free"):
        Pipeline.load(path, precision="float32")
