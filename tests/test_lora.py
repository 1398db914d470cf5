"""LoRA: our merge of a kohya file (random tensors, real SD 1.5 key names) gives the same weights as diffusers'
load_lora_weights + fuse_lora; the PEFT layout diffusers saves loads to the same; unmerged == merged; several
LoRAs with weights; merge / unmerge / remove; kohya save with metadata; original-layout names; errors; the
<lora:NAME:W> prompt syntax."""

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from nanodiffusion.checkpoint_keys import text_model_names
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.lora_files import (extract_lora_tags, find_lora, load_lora, parse_lora_arg, read_metadata,
                                      save_lora)
from nanodiffusion.models.clip import CLIPTextConfig as CLIPTextConfig_ours
from nanodiffusion.models.clip import CLIPTextModel as CLIPTextModel_ours
from nanodiffusion.models.lora import create_lora
from oracles import require

peft = require("peft")  # diffusers' LoRA loader needs it

TEXT = dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=12, vocab_size=1000,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
KOHYA_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")   # with LoCon convs
KOHYA_TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP")


def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5's block structure (3 cross-attention levels + 1 plain, 2 res blocks each) with tiny channels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(8, 16, 16, 16), layers_per_block=2, sample_size=8,
                                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_text() -> CLIPTextModel:
    """SD 1.5's text encoder structure (12 layers) with a tiny width."""
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(**TEXT))


def our_text(reference: CLIPTextModel) -> CLIPTextModel_ours:
    model = CLIPTextModel_ours(CLIPTextConfig_ours(**TEXT))
    model.load_state_dict(text_model_names(reference.state_dict()))
    return model


def kohya_targets(model: nn.Module, blocks: tuple[str, ...]) -> dict[str, nn.Module]:
    """kohya-ss's selection, by class name: Linear / Conv2d children of the named block classes."""
    found = {}
    for path, block in model.named_modules():
        if type(block).__name__ in blocks:
            for child_path, child in block.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    found[f"{path}.{child_path}"] = child
    return found


def random_kohya_lora(unet: nn.Module, text: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA with random tensors, as sd-scripts writes one: rank 4 / alpha 2 on Linear and 1x1 layers,
    rank 2 / alpha 3 LoCon on k x k convs (one network_alpha and one conv_alpha, as in real files)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, targets in (("lora_unet_", kohya_targets(unet, KOHYA_UNET_BLOCKS)),
                            ("lora_te_", kohya_targets(text, KOHYA_TEXT_BLOCKS))):
        for path, layer in targets.items():
            sd.update(random_kohya_layer(prefix + path.replace(".", "_"), layer, g))
    return sd


def random_kohya_layer(key: str, layer: nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's kohya tensors: rank 4 / alpha 2 on a Linear or 1x1 conv, rank 2 / alpha 3 LoCon on a k x k conv."""
    if isinstance(layer, nn.Linear):
        alpha, down, up = 2.0, (4, layer.in_features), (layer.out_features, 4)
    else:
        rank, alpha = (4, 2.0) if layer.kernel_size == (1, 1) else (2, 3.0)
        down, up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return {f"{key}.lora_down.weight": torch.randn(down, generator=g) * 0.1,
            f"{key}.lora_up.weight": torch.randn(up, generator=g) * 0.1, f"{key}.alpha": torch.tensor(alpha)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread beats several (no fork / join per op), and on a shared machine by far."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The kohya file, plus what diffusers makes of it: the PEFT-layout file it saves and the fused weights."""
    folder = tmp_path_factory.mktemp("lora")
    unet, text = sd15_unet(), sd15_text()
    kohya = random_kohya_lora(unet, our_text(text))
    save_file(kohya, folder / "kohya.safetensors")
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(folder / "kohya.safetensors", adapter_name="k")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=peft.get_peft_model_state_dict(unet, adapter_name="k"),
        text_encoder_lora_layers=peft.get_peft_model_state_dict(text, adapter_name="k"),
        unet_lora_adapter_metadata=unet.peft_config["k"].to_dict(),
        text_encoder_lora_adapter_metadata=text.peft_config["k"].to_dict(), weight_name="peft.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return dict(kohya=folder / "kohya.safetensors", peft=folder / "peft.safetensors", layers=len(kohya_names(kohya)),
                unet=unet.state_dict(), text=text_model_names(text.state_dict()))


def kohya_names(sd: dict) -> set[str]:
    return {key.split(".")[0] for key in sd}


def fresh_models() -> dict[str, nn.Module]:
    """The same base weights as the fixture's pipeline: the UNet as diffusers builds it, our text encoder."""
    return {"unet": sd15_unet(), "text_encoder": our_text(sd15_text())}


def assert_weights(models: dict[str, nn.Module], files: dict, changed: int) -> None:
    """Every UNet / text-encoder weight equals diffusers' fused one; `changed` of them differ from the base."""
    base = fresh_models()
    n = 0
    for part, key in (("unet", "unet"), ("text_encoder", "text")):
        ours, base_sd = models[part].state_dict(), base[part].state_dict()
        assert ours.keys() == files[key].keys()
        for name, tensor in ours.items():
            assert (tensor - files[key][name]).abs().max() <= 1e-5, name
            n += not torch.equal(tensor, base_sd[name])
    assert n == changed


def test_kohya_names_are_sd15_names(files):
    names = kohya_names(load_file(files["kohya"]))
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_1_proj_in", "lora_unet_mid_block_attentions_0_proj_out",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                 "lora_unet_down_blocks_2_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
                 "lora_unet_up_blocks_2_resnets_1_time_emb_proj",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_11_mlp_fc2"):
        assert name in names


def test_kohya_merge_matches_diffusers_fuse(files):
    models = fresh_models()
    network = load_lora(files["kohya"], models).merge(1.0)
    assert len(network.targets) == files["layers"]
    assert_weights(models, files, files["layers"])


def test_peft_layout_matches_diffusers_fuse(files):
    models = fresh_models()
    load_lora(files["peft"], models).merge(1.0)
    assert_weights(models, files, files["layers"])


def test_original_layout_names(files, tmp_path):
    """kohya names in the original SD UNet layout (input_blocks / middle_block / output_blocks) resolve to the
    same layers: SD 1.5 facts written out by hand."""
    renames = {"down_blocks_0_attentions_0_": "input_blocks_1_1_",
               "down_blocks_1_resnets_0_conv1": "input_blocks_4_0_in_layers_2",
               "down_blocks_2_downsamplers_0_conv": "input_blocks_9_0_op", "mid_block_attentions_0_": "middle_block_1_",
               "up_blocks_0_upsamplers_0_conv": "output_blocks_2_1_conv",
               "up_blocks_3_attentions_2_": "output_blocks_11_1_",
               "up_blocks_1_resnets_2_time_emb_proj": "output_blocks_5_0_emb_layers_1",
               "up_blocks_2_resnets_0_conv_shortcut": "output_blocks_6_0_skip_connection"}
    sd, renamed = load_file(files["kohya"]), {}
    for key, tensor in sd.items():
        for new, old in renames.items():
            key = key.replace("lora_unet_" + new, "lora_unet_" + old)
        renamed[key] = tensor
    assert len(kohya_names(renamed) - kohya_names(sd)) > 20
    save_file(renamed, tmp_path / "original.safetensors")
    models = fresh_models()
    load_lora(tmp_path / "original.safetensors", models).merge(1.0)
    assert_weights(models, files, files["layers"])


def outputs(models: dict[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return (models["unet"](x, 500, context).sample,
                models["text_encoder"](torch.randint(3, 1000, (1, 7), generator=g)))


def assert_close(a: tuple, b: tuple, atol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= atol


def test_unmerged_equals_merged_and_unmerge_restores(files):
    models = fresh_models()
    base = outputs(models)
    network = load_lora(files["kohya"], models).apply_unmerged(0.7)
    hooked = outputs(models)
    assert (hooked[0] - base[0]).abs().max() > 1e-3 and (hooked[1] - base[1]).abs().max() > 1e-3
    network.remove()
    assert_close(outputs(models), base, 0)
    network.merge(0.7)
    assert_close(outputs(models), hooked)
    network.remove()
    reference = fresh_models()
    for part in models:
        base = reference[part].state_dict()
        for name, tensor in models[part].state_dict().items():
            assert (tensor - base[name]).abs().max() <= 1e-6, name
    with pytest.raises(NanoDiffusionError, match="already applied"):
        network.merge().apply_unmerged()


def test_several_loras_with_weights(files, tmp_path):
    models = fresh_models()
    save_file(random_kohya_lora(models["unet"], models["text_encoder"], seed=1), tmp_path / "b.safetensors")
    a, b = load_lora(files["kohya"], models), load_lora(tmp_path / "b.safetensors", models)
    a.apply_unmerged(0.5)
    b.apply_unmerged(-0.3)
    both = outputs(models)
    a.weight = 0.0
    only_b = outputs(models)
    a.remove(), b.remove()
    a.merge(0.5), b.merge(-0.3)
    assert_close(outputs(models), both)
    a.unmerge()
    assert_close(outputs(models), only_b)


def test_save_kohya_with_metadata_round_trip(tmp_path):
    models = {"unet": sd15_unet(), "text_encoder": our_text(sd15_text())}
    network = create_lora(models, 4, 2.0, conv_rank=2, conv_alpha=1.0)
    for layer in network.layers().values():
        nn.init.normal_(layer.lora_up.weight)
    save_lora(network, tmp_path / "mine.safetensors", metadata={"ss_output_name": "mine", "ss_steps": 100})
    meta = read_metadata(tmp_path / "mine.safetensors")
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "100" and meta["ss_output_name"] == "mine"
    assert '"conv_dim": "2"' in meta["ss_network_args"]
    loaded = load_lora(tmp_path / "mine.safetensors", models).state_dict()
    assert loaded.keys() == network.state_dict().keys()
    for key, tensor in network.state_dict().items():
        assert torch.equal(loaded[key], tensor)
    assert kohya_names(network.state_dict()) == kohya_names(random_kohya_lora(models["unet"], models["text_encoder"]))


def small_text_model(width: int = 768) -> dict[str, nn.Module]:
    """A module tree with one SD 1.x-sized text-encoder layer name."""
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.q_proj = nn.Linear(width, width)
    root = nn.Module()
    root.text_model = nn.Module()
    root.text_model.encoder = nn.Module()
    root.text_model.encoder.layers = nn.ModuleList([layer])
    return {"text_encoder": root}


def write(tmp_path, sd: dict) -> str:
    save_file(sd, tmp_path / "x.safetensors")
    return tmp_path / "x.safetensors"


def test_errors(tmp_path):
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    ok = {f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(768, 4)}
    models = small_text_model()
    assert len(load_lora(write(tmp_path, ok), models).targets) == 1
    with pytest.raises(NanoDiffusionError, match=r"match nothing.*lora_unet_foo_bar_attn1_to_q"):
        load_lora(write(tmp_path, {**ok, "lora_unet_foo_bar_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
                                   "lora_unet_foo_bar_attn1_to_q.lora_up.weight": torch.zeros(8, 4)}), models)
    with pytest.raises(NanoDiffusionError, match=rf"rank mismatch.*{name}.*\(4, 768\).*\(768, 8\)"):
        load_lora(write(tmp_path, {**ok, f"{name}.lora_up.weight": torch.zeros(768, 8)}), models)
    sd2 = {f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(1024, 4)}
    with pytest.raises(NanoDiffusionError, match=r"q_proj is \(768, 768\).*SD 2\.x LoRA on an SD 1\.x model"):
        load_lora(write(tmp_path, sd2), models)
    with pytest.raises(NanoDiffusionError, match="not a LoRA file"):
        load_lora(write(tmp_path, {"model.diffusion_model.conv_in.weight": torch.zeros(2)}), models)
    with pytest.raises(NanoDiffusionError, match="LoHa"):
        load_lora(write(tmp_path, {**ok, f"{name}.hada_w1_a": torch.zeros(2)}), models)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(NanoDiffusionError, match="broken.safetensors"):
        load_lora(tmp_path / "broken.safetensors", models)


def test_diffusers_layouts_without_peft_metadata(tmp_path):
    """Older diffusers names: attention processors, .lora.down, lora_linear_layer; no header -> scale 1."""
    models = {"unet": sd15_unet(), "text_encoder": our_text(sd15_text())}
    g = torch.Generator().manual_seed(0)
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    layer = "text_model.encoder.layers.3"
    keys = {f"{attn}.processor.to_out_lora": ("unet", attn.removeprefix("unet.") + ".to_out.0"),
            "unet.mid_block.attentions.0.proj_in.lora": ("unet", "mid_block.attentions.0.proj_in"),
            f"text_encoder.{layer}.self_attn.to_k_lora": ("text_encoder", f"{layer}.self_attn.k_proj"),
            f"text_encoder.{layer}.mlp.fc1.lora_linear_layer": ("text_encoder", f"{layer}.mlp.fc1")}
    sd, expected = {}, {}
    for key, (part, path) in keys.items():
        weight = dict(models[part].named_modules())[path].weight
        down, up = torch.randn(3, weight.shape[1], generator=g), torch.randn(weight.shape[0], 3, generator=g)
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
        expected[(part, path + ".weight")] = weight + (up @ down).reshape(weight.shape)
    load_lora(write(tmp_path, sd), models).merge()
    for (part, name), tensor in expected.items():
        assert (models[part].state_dict()[name] - tensor).abs().max() <= 1e-5


def test_kohya_scale_is_alpha_over_rank(tmp_path):
    """Per-layer alpha / rank, alpha = rank (scale 1) when absent, LoCon on a strided 3x3 conv: by hand."""
    models = {"unet": sd15_unet(), "text_encoder": our_text(sd15_text())}
    g = torch.Generator().manual_seed(0)
    layers = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": ("unet", 4, 8.0),
              "lora_te_text_model_encoder_layers_10_mlp_fc1": ("text_encoder", 4, None),
              "lora_unet_down_blocks_1_downsamplers_0_conv": ("unet", 2, 1.0)}
    sd, expected = {}, {}
    for name, (part, rank, alpha) in layers.items():
        path = next(p for p in dict(models[part].named_modules()) if name.endswith(p.replace(".", "_")) and p)
        weight = dict(models[part].named_modules())[path].weight
        down = torch.randn(rank, *weight.shape[1:], generator=g)
        up = torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2), generator=g)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        delta = torch.einsum("or,ri...->oi...", up.flatten(1), down)
        expected[(part, path)] = weight + (rank if alpha is None else alpha) / rank * delta
    network = load_lora(write(tmp_path, sd), models).merge()
    assert sorted(network.targets) == sorted(layers)
    for (part, path), tensor in expected.items():
        assert (models[part].state_dict()[path + ".weight"] - tensor).abs().max() <= 1e-5, path


def test_prompt_tags_and_folder(tmp_path):
    prompt, tags = extract_lora_tags("a cat <lora:style A:0.8> on a mat <lora:detail> <lora:x:-1.5:te=1>")
    assert prompt == "a cat on a mat" and tags == [("style A", 0.8), ("detail", 1.0), ("x", -1.5)]
    assert extract_lora_tags("no tags") == ("no tags", [])
    with pytest.raises(NanoDiffusionError, match="bad LoRA weight"):
        extract_lora_tags("<lora:a:heavy>")
    (tmp_path / "sub").mkdir()
    for file in ("style A.pt", "style A.safetensors", "sub/detail.ckpt", "notes.txt"):
        (tmp_path / file).write_bytes(b"x")
    assert find_lora("style A", tmp_path) == tmp_path / "style A.safetensors"
    assert find_lora("detail", tmp_path) == tmp_path / "sub" / "detail.ckpt"
    with pytest.raises(NanoDiffusionError, match="no LoRA named 'nope'.*available: detail, style A"):
        find_lora("nope", tmp_path)
    assert parse_lora_arg("a/b.safetensors:0.6") == (parse_lora_arg("a/b.safetensors")[0], 0.6)
    assert parse_lora_arg("C:/x.safetensors") == (parse_lora_arg("C:/x.safetensors")[0], 1.0)
