"""Checkpoint formats: key tables against diffusers' own single-file converter, safe loading, detection,
config inference, diffusers folders (our save -> their load, their save -> our load), hash, convert."""

import hashlib
import json
import pickle

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from nanodiffusion.checkpoint_configs import infer_unet_config, infer_vae_config
from nanodiffusion.checkpoint_keys import diffusers_to_original, original_to_diffusers, text_model_names
from nanodiffusion.checkpoints import (Checkpoint, convert, default_scheduler, describe, detect_version,
                                       load_checkpoint, load_folder, load_into, load_state_dict, model_hash,
                                       save_diffusers, save_single_file)
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.clip import CLIPTextConfig as CLIPTextConfig_ours
from nanodiffusion.models.clip import CLIPTextModel as CLIPTextModel_ours
from nanodiffusion import weight_files as weight_files_module
from nanodiffusion.weight_files import prefetch, weight_files
from oracles import clip_tokenizer_dir

SD1_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SD2_UNET = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)


def tiny_unet(**kw) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=16, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8)
    return UNet2DConditionModel(**{**config, **kw})


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32,
                         sample_size=32)


def tiny_clip(layers: int = 2, hidden: int = 32) -> CLIPTextModel:
    torch.manual_seed(2)
    return CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=layers, vocab_size=1000, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def v1_parts():
    return {"unet": tiny_unet().state_dict(), "vae": tiny_vae().state_dict(),
            "text_encoder": text_model_names(tiny_clip().state_dict())}


@pytest.mark.parametrize("unet_kw", [{}, dict(use_linear_projection=True, in_channels=9)],
                         ids=["conv", "linear-inpaint"])
def test_unet_and_vae_match_diffusers_single_file_converter(unet_kw):
    unet, vae = tiny_unet(**unet_kw), tiny_vae()
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    original = diffusers_to_original(parts)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4    # conv1x1 in the original
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in original      # upsampler after attention
    assert_same(convert_ldm_unet_checkpoint(original, dict(unet.config)), parts["unet"])
    assert_same(convert_ldm_vae_checkpoint(original, dict(vae.config)), parts["vae"])
    back = original_to_diffusers(original)
    assert_same(back["unet"], parts["unet"])
    assert_same(back["vae"], parts["vae"])


@pytest.mark.parametrize("unet_kw", [SD1_UNET, SD2_UNET], ids=["sd1", "sd2"])
def test_full_size_layouts_round_trip(unet_kw):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kw)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    original = diffusers_to_original(parts)
    assert len(original) == len(parts["unet"]) + len(parts["vae"])
    assert convert_ldm_unet_checkpoint(original, dict(unet.config)).keys() == parts["unet"].keys()
    assert convert_ldm_vae_checkpoint(original, dict(vae.config)).keys() == parts["vae"].keys()
    back = original_to_diffusers(original)
    version = "v2" if unet_kw is SD2_UNET else "v1"
    assert detect_version(original) == version
    inferred = infer_unet_config(back["unet"], version)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "in_channels", "out_channels"):
        assert inferred[key] == (list(unet.config[key]) if isinstance(unet.config[key], tuple) else unet.config[key])
    vae_config = infer_vae_config(back["vae"], version)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
        assert vae_config[key] == (list(vae.config[key]) if isinstance(vae.config[key], tuple) else vae.config[key])


def test_sd1_text_encoder_matches_diffusers_converter(v1_parts):
    original = diffusers_to_original(v1_parts)
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in original
    theirs = convert_ldm_clip_checkpoint(original)
    assert_same(theirs, v1_parts["text_encoder"])
    assert_same(original_to_diffusers(original)["text_encoder"], v1_parts["text_encoder"])
    assert detect_version(original) == "v1"


def test_sd2_open_clip_matches_diffusers_converter(tmp_path):
    model = tiny_clip(layers=23)           # SD 2.x: diffusers keeps 23 of OpenCLIP's 24 layers
    text = text_model_names(model.state_dict())        # transformers 5 saves without "text_model."
    original = diffusers_to_original({"unet": tiny_unet().state_dict(), "text_encoder": text}, open_clip=True)
    prefix = "cond_stage_model.model."
    assert original[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert not original[prefix + "transformer.resblocks.23.mlp.c_fc.weight"].any()     # the unused last layer
    assert prefix + "transformer.resblocks.24.ln_1.weight" not in original
    assert torch.equal(original[prefix + "transformer.resblocks.0.attn.in_proj_weight"][32:64],
                       text["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    theirs = convert_open_clip_checkpoint(model, original, prefix=prefix)
    assert_same(theirs, text)
    assert_same(original_to_diffusers(original)["text_encoder"], text)
    assert detect_version(original) == "v2"
    save_file(original, tmp_path / "v2.safetensors")
    ckpt = load_checkpoint(tmp_path / "v2.safetensors", prediction="v_prediction")
    config = ckpt.configs["text_encoder"]
    assert (config["num_hidden_layers"], config["hidden_act"]) == (23, "gelu")
    assert ckpt.scheduler["prediction_type"] == "v_prediction" and ckpt.configs["unet"]["sample_size"] == 96
    ckpt.tokenizer_dir = clip_tokenizer_dir()
    save_diffusers(ckpt, tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert json.loads((tmp_path / "v2" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    with pytest.raises(NanoDiffusionError, match="unknown prediction type 'x'"):
        load_checkpoint(tmp_path / "v2.safetensors", prediction="x")


def test_non_model_keys_skipped_and_unknown_keys_named(v1_parts):
    original = diffusers_to_original(v1_parts)
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelinput_blocks00weight": torch.ones(1),
             "alphas_cumprod": torch.ones(1000), "cond_stage_model.transformer.text_model.embeddings.position_ids":
             torch.arange(77)[None]}
    assert_same(original_to_diffusers({**original, **extra})["unet"], v1_parts["unet"])
    bad = {**original, "model.diffusion_model.bogus.weight": torch.ones(1)}
    with pytest.raises(NanoDiffusionError, match=r"UNet: 1 unexpected keys \(bogus.weight\)"):
        original_to_diffusers(bad)
    with pytest.raises(NanoDiffusionError, match="no UNet weights"):
        original_to_diffusers({"first_stage_model.x": torch.ones(1)})


def test_detection_of_version_and_inpainting(tmp_path, v1_parts):
    inpaint = {**v1_parts, "unet": tiny_unet(in_channels=9).state_dict()}
    save_file(diffusers_to_original(inpaint), tmp_path / "inpaint.safetensors")
    ckpt = load_checkpoint(tmp_path / "inpaint.safetensors")
    assert ckpt.info["inpainting"] and ckpt.configs["unet"]["in_channels"] == 9 and ckpt.info["version"] == "v1"
    save_file(diffusers_to_original(v1_parts), tmp_path / "plain.safetensors")
    plain = load_checkpoint(tmp_path / "plain.safetensors", prediction="v_prediction")
    assert not plain.info["inpainting"] and plain.scheduler["prediction_type"] == "v_prediction"
    unet_only = diffusers_to_original({"unet": tiny_unet(cross_attention_dim=1024).state_dict()})
    assert detect_version(unet_only) == "v2"


def test_inferred_configs_build_models_that_load(tmp_path, v1_parts):
    save_file(diffusers_to_original(v1_parts), tmp_path / "m.safetensors")
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    unet = UNet2DConditionModel.from_config(ckpt.configs["unet"])
    unet.load_state_dict(ckpt.parts["unet"])
    vae = AutoencoderKL.from_config(ckpt.configs["vae"])
    vae.load_state_dict(ckpt.parts["vae"])
    text = ckpt.configs["text_encoder"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]) == (32, 2, 37)
    ours = CLIPTextModel_ours(CLIPTextConfig_ours.from_dict({**text, "num_attention_heads": 4}))
    load_into(ours, ckpt.parts["text_encoder"], "text encoder")
    assert torch.equal(ours.text_model.final_layer_norm.weight,
                       v1_parts["text_encoder"]["text_model.final_layer_norm.weight"])


# ---- Safe loading ----

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    if writer == "pickle":      # a plain pickle (legacy torch.save layout starts the same way)
        path.write_bytes(pickle.dumps({"hook": Evil(marker), "w": [1.0]}, protocol=2))
    else:
        torch.save({"hook": Evil(marker), "state_dict": {"w": torch.ones(1)}}, path)
    refused = r"refused to load.*run (io|builtins)\.open; nothing was executed"
    with pytest.raises(NanoDiffusionError, match=refused) as err:
        load_state_dict(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_broken_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    cases = {"empty.safetensors": (b"", "empty"),
             "cut.safetensors": (data[: len(data) // 2], "truncated"),
             "cut_header.safetensors": (data[:40], "truncated"),
             "notes.txt": (b"hello world, not a model", "unknown format"),
             "model.gguf": (b"GGUF\x03\x00\x00\x00" + bytes(64), "unknown format")}
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full.pt")
    cases["cut.pt"] = ((tmp_path / "full.pt").read_bytes()[:300], "truncated or corrupt")
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NanoDiffusionError, match=problem) as err:
            load_state_dict(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NanoDiffusionError, match="no such"):
        load_state_dict(tmp_path / "missing.ckpt")


def test_sniffs_header_not_extension_and_unwraps_state_dict(tmp_path):
    weights = {"a": torch.randn(3, dtype=torch.float16), "b": torch.randn(2, dtype=torch.bfloat16),
               "i": torch.arange(3)}
    torch.save({"state_dict": weights, "global_step": 7}, tmp_path / "model.safetensors")   # misnamed .ckpt
    loaded = load_state_dict(tmp_path / "model.safetensors")
    assert loaded.keys() == weights.keys()
    assert [loaded[k].dtype for k in "abi"] == [torch.float32, torch.float32, torch.int64]
    assert torch.equal(loaded["a"], weights["a"].float())
    kept = load_state_dict(tmp_path / "model.safetensors", keep_dtype=True)
    assert kept["a"].dtype == torch.float16 and kept["b"].dtype == torch.bfloat16


def test_load_into_names_missing_unexpected_and_shape_problems():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    sd = model.state_dict()
    with pytest.raises(NanoDiffusionError, match=r"net: 1 missing keys \(1.bias\)"):
        load_into(model, {k: v for k, v in sd.items() if k != "1.bias"}, "net")
    with pytest.raises(NanoDiffusionError, match=r"net: 2 unexpected keys \(extra.a, extra.b\)"):
        load_into(model, {**sd, "extra.a": torch.ones(1), "extra.b": torch.ones(1)}, "net")
    with pytest.raises(NanoDiffusionError, match=r"shape mismatch for 0.weight: checkpoint \(3, 3\), model \(3, 2\)"):
        load_into(model, {**sd, "0.weight": torch.ones(3, 3)}, "net")
    new = {k: torch.randn_like(v) for k, v in sd.items()}
    load_into(model, new, "net")
    assert torch.equal(model[1].weight, new["1.weight"])


# ---- Hash, folders, convert ----

def test_model_hash_is_sha256_prefix(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(300, 1000)}, path)   # > 1 MiB: several chunks
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_model_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """The digest is read from the cache while size and mtime stand, and computed again when the file changes."""
    import json
    import os

    from nanodiffusion.file_hashes import cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(10)}, path)
    true = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_hash(path) == true[:10]
    cache = json.loads(cache_path().read_text())
    assert cache[str(path.resolve())]["sha256"] == true
    cache[str(path.resolve())]["sha256"] = "f" * 64   # a remembered digest is used as it is: the file is not read
    cache_path().write_text(json.dumps(cache))
    assert model_hash(path) == "f" * 10
    save_file({"w": torch.ones(10)}, path)
    os.utime(path, ns=(1, 1))                          # same size, another mtime: hashed again
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10] != true[:10]
    cache_path().write_text("{not json")               # an unreadable cache is only slower
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def tiny_checkpoint(v1_parts) -> Checkpoint:
    unet, vae, text = tiny_unet(), tiny_vae(), tiny_clip()
    configs = {"unet": dict(unet.config), "vae": dict(vae.config),
               "text_encoder": {k: v for k, v in text.config.to_dict().items() if not k.startswith("_")}}
    return Checkpoint(v1_parts, configs, default_scheduler("epsilon"), {"version": "v1"}, clip_tokenizer_dir())


def test_written_folder_loads_in_diffusers_pipeline(tmp_path, v1_parts):
    ckpt = tiny_checkpoint(v1_parts)
    save_diffusers(ckpt, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert_same(pipe.unet.state_dict(), v1_parts["unet"])
    assert_same(pipe.vae.state_dict(), v1_parts["vae"])
    assert_same(text_model_names(pipe.text_encoder.state_dict()), v1_parts["text_encoder"])
    assert pipe.tokenizer("a cat").input_ids[:2] == [49406, 320]
    back = load_folder(tmp_path / "pipe")
    for name in v1_parts:
        assert_same(back.parts[name], v1_parts[name])
    unet_file = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    assert model_hash(tmp_path / "pipe") == model_hash(unet_file)

    pipe.save_pretrained(tmp_path / "theirs", safe_serialization=False, variant="fp16")   # their save -> our load
    assert (tmp_path / "theirs" / "unet" / "diffusion_pytorch_model.fp16.bin").exists()
    theirs = load_checkpoint(tmp_path / "theirs")
    for name in v1_parts:
        assert_same(theirs.parts[name], v1_parts[name])
    assert theirs.configs["unet"]["block_out_channels"] == [32, 32, 64]
    assert theirs.tokenizer_dir == tmp_path / "theirs" / "tokenizer"


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_folder_loads_and_a_missing_shard_is_one_line(tmp_path, v1_parts, variant):
    """diffusers and transformers shard a part over max_shard_size (10 GB / 5 GB by default: SDXL's fp32 UNet,
    SD3's T5, SD 3.5 Large's transformer) into NAME-0000k-of-0000n files named by NAME.index[.variant].json."""
    save_diffusers(tiny_checkpoint(v1_parts), tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="20KB", variant=variant)
    suffix = ".fp16.json" if variant else ".json"
    for part, index in (("unet", "diffusion_pytorch_model.safetensors.index"),
                        ("text_encoder", "model.safetensors.index")):
        assert (tmp_path / "sharded" / part / (index + suffix)).is_file()
        assert len(list((tmp_path / "sharded" / part).glob("*-of-*.safetensors"))) > 2
    loaded = load_checkpoint(tmp_path / "sharded")
    for name in v1_parts:
        assert_same(loaded.parts[name], v1_parts[name])
    assert len(model_hash(tmp_path / "sharded")) == 10
    shards = sorted((tmp_path / "sharded" / "unet").glob("*-of-*.safetensors"))
    assert set(shards) <= set(weight_files(tmp_path / "sharded"))

    shard = shards[1]
    shard.unlink()
    with pytest.raises(NanoDiffusionError, match=f"{shard.name}: missing.*download is incomplete"):
        load_checkpoint(tmp_path / "sharded")


def test_generate_reads_the_weights_ahead_in_the_background(tmp_path, v1_parts, monkeypatch):
    """`nanodiff generate` reads every weights file the load will use (and no other variant) through once, in a
    background thread, while torch imports."""
    save_diffusers(tiny_checkpoint(v1_parts), tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not read")
    read = []
    monkeypatch.setattr(weight_files_module, "read_through", read.append)
    prefetch(tmp_path / "pipe").join()
    assert read == [tmp_path / "pipe" / part / name for part, name in (
        ("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"))]
    single = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    assert weight_files(single) == [single]
    assert prefetch(tmp_path / "no such model") is None


def test_convert_both_ways_and_describe(tmp_path, v1_parts):
    ckpt = tiny_checkpoint(v1_parts)
    save_single_file(ckpt, tmp_path / "model.safetensors")
    convert(tmp_path / "model.safetensors", tmp_path / "folder", tokenizer=clip_tokenizer_dir())
    assert json.loads((tmp_path / "folder" / "model_index.json").read_text())["unet"] == ["diffusers",
                                                                                      "UNet2DConditionModel"]
    convert(tmp_path / "folder", tmp_path / "again.safetensors")
    assert_same(load_state_dict(tmp_path / "again.safetensors"), load_state_dict(tmp_path / "model.safetensors"))
    again = load_checkpoint(tmp_path / "again.safetensors")
    assert again.configs["unet"]["attention_head_dim"] == ckpt.configs["unet"]["attention_head_dim"]
    info = describe(tmp_path / "model.safetensors")
    assert info["format"] == "safetensors" and info["version"] == "v1" and not info["inpainting"]
    assert info["parameters"]["unet"] == sum(t.numel() for t in v1_parts["unet"].values())
    assert info["dtype"] == "float32"
    assert info["hash"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()[:10]
    with pytest.raises(NanoDiffusionError, match="not a diffusers pipeline"):
        load_checkpoint(tmp_path)
    with pytest.raises(NanoDiffusionError, match=".safetensors only"):
        convert(tmp_path / "folder", tmp_path / "out.ckpt")


@pytest.mark.parametrize("bias,expected", [(-3.0, "v_prediction"), (0.0, "epsilon")])
def test_sd2_single_file_prediction_is_probed(tmp_path, bias, expected):
    """An SD 2.x single file cannot say its prediction type: the web UI's one-call probe (mean(F(x) - x) < -1 at
    t = 999 on x = 0.5) decides, `nanodiff info` says which and why, and an explicit prediction overrides it."""
    from nanodiffusion.checkpoints import settle_prediction

    unet = tiny_unet(cross_attention_dim=1024, block_out_channels=(64, 64, 128), use_linear_projection=True)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.constant_(unet.conv_out.bias, bias)   # F = bias: a v model answers about -x0, far below x
    path = tmp_path / "v2.safetensors"
    save_file(diffusers_to_original({"unet": unet.state_dict()}), path)
    info = describe(path)
    assert info["version"] == "v2" and info["prediction"] == expected and "probe" in info["prediction_from"]
    ckpt = load_checkpoint(path)
    settle_prediction(ckpt)
    assert ckpt.scheduler["prediction_type"] == expected
    assert ckpt.configs["unet"]["sample_size"] == (96 if expected == "v_prediction" else 64)
    forced = load_checkpoint(path, prediction="epsilon")
    settle_prediction(forced)
    assert forced.info["prediction"] == "epsilon" and forced.info["prediction_from"] == "set by --prediction"


FLUX_FILES = {   # a few real key names of each layout, on tiny tensors
    "bfl": ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"],
    "comfy": ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae.decoder.conv_in.weight"],
    "diffusers": ["transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.attn.to_q.weight",
                  "x_embedder.weight"]}


@pytest.mark.parametrize("layout", FLUX_FILES)
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_flux_file_is_one_clear_line(tmp_path, layout, suffix):
    from nanodiffusion.pipeline import Pipeline

    sd = {key: torch.zeros(2, 2) for key in FLUX_FILES[layout]}
    path = tmp_path / f"flux1-dev{suffix}"
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    found = next(key for key in FLUX_FILES[layout] if "single_" in key or "double_" in key
                 ).removeprefix("model.diffusion_model.")
    for load in (load_checkpoint, Pipeline.load):
        with pytest.raises(NanoDiffusionError, match=rf"^Flux.1 is not supported: flux1-dev{suffix} is a Flux.1 "
                                                     rf"transformer \({found}, \.\.\.\)"):
            load(path)


def test_unknown_model_file_names_what_it_holds(tmp_path):
    sd = {key: torch.zeros(2) for key in ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight",
                                          "context_embedder.weight", "model.diffusion_model.joint_blocks.0.x")}
    save_file(sd, tmp_path / "mystery.safetensors")
    with pytest.raises(NanoDiffusionError, match=r"^unknown model file mystery.safetensors: no Stable Diffusion UNet.*"
                                                 r"holds (transformer_blocks|pos_embed|context_embedder|joint_blocks)"
                                                 r"(, \w+){3} \(4 tensors\)"):
        load_checkpoint(tmp_path / "mystery.safetensors")


@pytest.mark.parametrize("transformer, message", [("FluxTransformer2DModel", "Flux.1 is not supported: flux is a "
                                                   "Flux.1 pipeline"),
                                                  ("PixArtTransformer2DModel", "unknown model flux: its transformer/ "
                                                   "is a PixArtTransformer2DModel")])
def test_folder_with_another_transformer_is_one_clear_line(tmp_path, transformer, message):
    (tmp_path / "flux" / "transformer").mkdir(parents=True)
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "flux" / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    with pytest.raises(NanoDiffusionError, match="^" + message):
        load_checkpoint(tmp_path / "flux")
