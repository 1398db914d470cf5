"""SDXL LoRA files on a tiny random SDXL pipeline, against diffusers' load_lora_weights: kohya files (`lora_unet_` in
the original SGM layout as sd-scripts writes SDXL, and in diffusers names; `lora_te1_` for CLIP ViT-L, `lora_te2_`
for OpenCLIP bigG) and the PEFT layout diffusers saves (`unet.`, `text_encoder.`, `text_encoder_2.`) give the same
UNet and text-encoder outputs and the same image; real kohya SDXL names resolve on the full-size SDXL UNet; a LoRA
made for another base model (SDXL on SD 1.x, SD 1.5 on SDXL) is one clear line."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from nanodiffusion.checkpoint_keys import TEXT_MODEL, UNetLayout, unet_table
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.lora_files import load_lora, module_names
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from oracles import clip_tokenizer_dir, require

diffusers = require("diffusers")
transformers = require("transformers")
peft = require("peft")   # diffusers' LoRA loader needs it
from test_lora import one_thread, random_kohya_layer  # noqa: E402, F401 (one_thread: an autouse fixture)
from test_sdxl import PROMPTS, full_parts  # noqa: E402

UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")   # kohya's, with LoCon convs
TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP")
PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_targets(model: nn.Module, blocks: tuple[str, ...]) -> list[str]:
    """kohya-ss's selection, by class name: the paths of the Linear / Conv2d layers inside the named blocks."""
    return [f"{path}.{child_path}" for path, block in model.named_modules() if type(block).__name__ in blocks
            for child_path, child in block.named_modules() if isinstance(child, (nn.Linear, nn.Conv2d))]


def random_kohya_sdxl(models: dict[str, nn.Module], *, sgm: bool) -> dict[str, torch.Tensor]:
    """A kohya SDXL LoRA with random tensors: rank 4 / alpha 2 on Linear and 1x1 layers, rank 2 / alpha 3 LoCon on
    k x k convs; with `sgm` the UNet names are the original layout's, as sd-scripts trains SDXL on its SGM UNet."""
    g = torch.Generator().manual_seed(0)
    table = unet_table(UNetLayout.from_diffusers(models["unet"].state_dict()))
    sd = {}
    for part, prefix in PARTS.items():
        model = models[part]
        for path in kohya_targets(model, UNET_BLOCKS if part == "unet" else TEXT_BLOCKS):
            layer = model.get_submodule(path)
            if part != "unet":   # sd-scripts' names: transformers 4 CLIP paths ("text_model.encoder.layers...")
                name = TEXT_MODEL + path.removeprefix(TEXT_MODEL)
            else:
                name = table.rename(path + ".weight", to_original=True)[0].removesuffix(".weight") if sgm else path
            sd.update(random_kohya_layer(prefix + name.replace(".", "_"), layer, g))
    return sd


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """diffusers' tiny SDXL pipeline, our Pipeline on the folder it saves, and LoRA files: kohya in SGM and in
    diffusers names, and the PEFT layout diffusers saves after loading the kohya file."""
    from nanodiffusion.pipeline import Pipeline

    folder = tmp_path_factory.mktemp("sdxl_lora")
    tokenizers = str(clip_tokenizer_dir())
    reference = diffusers.StableDiffusionXLPipeline(
        **full_parts(), tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizers, model_max_length=77),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tokenizers, model_max_length=77, pad_token="!"),
        scheduler=diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1))
    reference.save_pretrained(folder / "model")
    files = {}
    for sgm in (True, False):
        files["kohya_sgm" if sgm else "kohya"] = folder / f"kohya_{'sgm' if sgm else 'diffusers'}.safetensors"
        save_file(random_kohya_sdxl({part: getattr(reference, part) for part in PARTS}, sgm=sgm),
                  files["kohya_sgm" if sgm else "kohya"])
    reference.load_lora_weights(files["kohya_sgm"], adapter_name="k")
    parts = {part: getattr(reference, part) for part in PARTS}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder, weight_name="peft.safetensors",
        **{f"{part}_lora_layers": peft.get_peft_model_state_dict(m, adapter_name="k") for part, m in parts.items()},
        **{f"{part}_lora_adapter_metadata": m.peft_config["k"].to_dict() for part, m in parts.items()})
    reference.unload_lora_weights()
    files["peft"] = folder / "peft.safetensors"
    return reference, Pipeline.load(folder / "model", precision="float32"), files


def inputs(pipe) -> tuple:
    """Fixed UNet inputs (latents, t, context, added conditioning) and token ids of both tokenizers."""
    g = torch.Generator().manual_seed(3)
    unet = pipe.unet
    added = {"text_embeds": torch.randn(2, 48, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    ids = torch.randint(1, 49000, (2, 77), generator=g)
    return (torch.randn(2, 4, 8, 8, generator=g), 500, torch.randn(2, 7, unet.config.cross_attention_dim,
                                                                    generator=g), added, ids)


@torch.no_grad()
def reference_outputs(reference, lora: str | None) -> list[torch.Tensor]:
    """diffusers' UNet output and both text encoders' penultimate hidden states, with `lora` loaded."""
    if lora is not None:
        reference.load_lora_weights(lora, adapter_name="x")
    x, t, context, added, ids = inputs(reference)
    found = [reference.unet(x, t, context, added_cond_kwargs=added).sample,
             reference.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
             reference.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]]
    if lora is not None:
        reference.unload_lora_weights()
    return found


@torch.no_grad()
def our_outputs(pipe) -> list[torch.Tensor]:
    x, t, context, added, ids = inputs(pipe)
    return [pipe.unet(x, t, context, **added), pipe.text_encoder.hidden_states(ids)[-2],
            pipe.text_encoder_2.hidden_states(ids)[-2]]


def models_of(pipe) -> dict[str, nn.Module]:
    return {part: getattr(pipe, part) for part in PARTS}


@pytest.mark.parametrize("layout", ["kohya_sgm", "kohya", "peft"])
def test_lora_outputs_match_diffusers(sdxl, layout):
    reference, pipe, files = sdxl
    base = our_outputs(pipe)
    expected = reference_outputs(reference, str(files[layout]))
    network = load_lora(files[layout], models_of(pipe)).apply_unmerged(1.0)
    try:
        got = our_outputs(pipe)
    finally:
        network.remove()
    assert {name.split("_")[1] for name in network.targets} == {"unet", "te", "te2"}
    for ours, theirs, before in zip(got, expected, base):
        assert (ours - theirs).abs().max() <= 1e-4
        assert (theirs - before).abs().max() > 1e-2    # the LoRA changes every network's output
    for ours, before in zip(our_outputs(pipe), base):
        assert torch.equal(ours, before)


def test_sgm_and_diffusers_kohya_names_are_the_same_layers(sdxl):
    _, pipe, files = sdxl
    networks = [load_lora(files[layout], models_of(pipe)).state_dict() for layout in ("kohya_sgm", "kohya")]
    assert networks[0].keys() == networks[1].keys() and len(networks[0]) > 100
    assert all(torch.equal(networks[0][key], networks[1][key]) for key in networks[0])


def test_image_with_lora_matches_diffusers(sdxl):
    """The whole pipeline with a kohya SGM-layout LoRA: the same image as diffusers' to 2/255."""
    reference, pipe, files = sdxl
    reference.load_lora_weights(str(files["kohya_sgm"]), adapter_name="x")
    expected = reference(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                         generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    reference.unload_lora_weights()
    plain = np.asarray(pipe(PROMPTS[0], steps=3, cfg=5.0, width=64, height=64, seed=7, sampler="euler")[0])
    image = pipe(PROMPTS[0], steps=3, cfg=5.0, width=64, height=64, seed=7, sampler="euler",
                 loras=[(files["kohya_sgm"], 1.0)])[0]
    ours = torch.tensor(np.asarray(image), dtype=torch.float32) / 255
    assert (ours - torch.from_numpy(expected)).abs().max() <= 2 / 255
    assert np.abs(np.asarray(image).astype(int) - plain).max() > 10   # the LoRA changes the image


def test_published_kohya_sdxl_names_resolve_on_the_full_size_unet():
    """Names as sd-scripts writes them for SDXL (SGM layout), to the diffusers layers they adapt."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.sdxl())
    names = module_names({"unet": unet})
    expected = {"input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0"
                                                                     ".attn1.to_q",
                "input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff"
                                                                  ".net.2",
                "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
                "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
                "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
                "middle_block_1_transformer_blocks_9_attn2_to_k": "mid_block.attentions.0.transformer_blocks.9.attn2"
                                                                  ".to_k",
                "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
                "output_blocks_0_1_proj_in": "up_blocks.0.attentions.0.proj_in",
                "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
                "output_blocks_5_1_transformer_blocks_1_attn2_to_out_0": "up_blocks.1.attentions.2.transformer_blocks"
                                                                         ".1.attn2.to_out.0",
                "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2"}
    for name, path in expected.items():
        assert names["lora_unet_" + name] == ("unet", path)


def lora_file(tmp_path, layers: dict[str, tuple[int, int]], metadata: dict | None = None) -> str:
    """A kohya file of rank-1 layers {name: (in, out)}."""
    sd = {}
    for name, (width, out) in layers.items():
        sd |= {f"{name}.lora_down.weight": torch.zeros(1, width), f"{name}.lora_up.weight": torch.zeros(out, 1)}
    save_file(sd, tmp_path / "lora.safetensors", metadata=metadata)
    return tmp_path / "lora.safetensors"


def test_lora_for_another_base_model_is_one_clear_line(sdxl, tmp_path):
    _, pipe, _ = sdxl
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = {"unet": UNet2DConditionModel(UNetConfig.tiny(cross_attention_dim=768))}
    xl_text = lora_file(tmp_path, {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)})
    with pytest.raises(NanoDiffusionError, match=r"made for SDXL, but the loaded model is SD 1\.x"):
        load_lora(xl_text, sd15)
    with pytest.raises(NanoDiffusionError, match=r"made for SDXL, but the loaded model is SD 1\.x"):
        load_lora(lora_file(tmp_path, {to_k: (2048, 32)}), sd15)
    with pytest.raises(NanoDiffusionError, match=r"made for SDXL, but the loaded model is an SD 1\.x / 2\.x-style"):
        load_lora(xl_text, {"unet": UNet2DConditionModel(UNetConfig.tiny())})
    with pytest.raises(NanoDiffusionError, match=r"made for SD 1\.x, but the loaded model is SDXL"):
        load_lora(lora_file(tmp_path, {to_k: (768, 320)}), models_of(pipe))
    with pytest.raises(NanoDiffusionError, match=r"lora.safetensors: this LoRA was made for SD 1\.x, but the loaded "
                                                 r"model is SDXL; load it with a model of its own base"):
        load_lora(lora_file(tmp_path, {"lora_unet_foo": (8, 8)}, {"ss_base_model_version": "sd_v1"}), models_of(pipe))
    with pytest.raises(NanoDiffusionError, match=r"made for SD 2\.x, but the loaded model is SD 1\.x"):
        load_lora(lora_file(tmp_path, {to_k: (1024, 32)}), sd15)
