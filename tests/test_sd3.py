"""SD3 / SD3.5 networks against diffusers and transformers: same random weights (loaded with strict=True), same
inputs -> same outputs. MMDiT (plain, QK RMSNorm, dual attention), T5 encoder and tokenizer, the 16-channel VAE
with its shift, and the shifted rectified-flow schedule stepped by our Euler against FlowMatchEulerDiscreteScheduler;
then the whole txt2img pipeline on a tiny StableDiffusion3Pipeline folder, with and without T5."""

from __future__ import annotations

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


def sd3_parts(diffusers, transformers, t5: bool) -> dict:
    """Tiny SD3 networks built by diffusers / transformers: MMDiT (joint width 32), 16-channel VAE, CLIP-L and CLIP-G
    with projections (16 wide each, pooled 24 + 40), T5 (d_model 32) or None, and the pipeline's tokenizers."""
    torch.manual_seed(5)
    clip = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    folder = str(clip_tokenizer_dir())
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16)
    text_encoders = {
        "text_encoder": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            **clip, hidden_act="quick_gelu", projection_dim=24)),
        "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            **clip, hidden_act="gelu", projection_dim=40)),
        "text_encoder_3": transformers.T5EncoderModel(transformers.T5Config(**{**TINY_T5, "vocab_size": 80,
                                                                                "d_model": 32})) if t5 else None}
    for seed, (model, std) in enumerate([(transformer, STD), *((m, TEXT_STD) for m in text_encoders.values() if m)]):
        randomise(model, std, seed)
    return {
        "transformer": transformer.eval(),
        "vae": diffusers.AutoencoderKL(**SD3_VAE).eval(),
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
