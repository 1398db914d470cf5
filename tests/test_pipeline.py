"""Pipeline behaviour on a tiny random model: seeds, batches, PNG parameters, LoRA, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.images import save_png, to_pil, to_tensor
from nanodiffusion.lora_files import save_lora
from nanodiffusion.models.lora import create_lora
from nanodiffusion.pipeline import Interrupted, Pipeline, PromptWarning
from nanodiffusion.prompts import parse_parameters

SIZE = 32


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipeline(SIZE)


def pixels(images):
    return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32)) for image in images])


def test_same_seed_same_image_and_batch_uses_consecutive_seeds(pipe):
    batch = pipe("a red circle", steps=3, seed=11, batch=2)
    first = pipe("a red circle", steps=3, seed=11)
    second = pipe("a red circle", steps=3, seed=12)
    assert torch.equal(pixels(batch[:1]), pixels(first))
    assert torch.equal(pixels(batch[1:]), pixels(second))
    assert not torch.equal(pixels(first), pixels(second))


def test_png_parameters_round_trip(pipe, tmp_path):
    image = pipe("a (red:1.2) circle", "blue", steps=3, seed=5, cfg=4.5, sampler="DPM++ 2M", schedule="karras")[0]
    path = save_png(image, tmp_path / "x.png")
    with Image.open(path) as loaded:
        prompt, negative, settings = parse_parameters(loaded.info["parameters"])
    assert (prompt, negative) == ("a (red:1.2) circle", "blue")
    assert settings["Steps"] == "3" and settings["Sampler"] == "DPM++ 2M" and settings["Seed"] == "5"
    assert settings["CFG scale"] == "4.5" and settings["Size"] == f"{SIZE}x{SIZE}"
    assert settings["Schedule type"] == "Karras" and settings["Model hash"] == "0123456789"


def test_emphasis_changes_the_image_only_through_the_weighted_word(pipe):
    plain, neutral, red, circle = (pixels(pipe(text, steps=3, seed=1)) for text in (
        "a red circle", "a (red:1.0) circle", "a (red:1.5) circle", "a red (circle:1.5)"))
    assert torch.equal(plain, neutral)  # weight 1 is the plain prompt: the syntax itself changes nothing
    assert (red - plain).abs().mean() > 1 and (circle - plain).abs().mean() > 1 and (red - circle).abs().mean() > 1


def test_every_sampler_runs(pipe):
    from nanodiffusion.samplers import SAMPLERS

    for name in SAMPLERS:
        image = pixels(pipe("a red circle", steps=4, seed=2, sampler=name))
        assert image.shape == (1, SIZE, SIZE, 3) and image.std() > 5, name  # not flat, not black
        assert torch.equal(image, pixels(pipe("a red circle", steps=4, seed=2, sampler=name))), name  # seeded


def test_img2img_runs(pipe):
    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    assert pipe("a circle", steps=4, seed=3, init_image=init, strength=0.5)[0].size == (SIZE, SIZE)


def test_inpaint_keeps_the_unmasked_region_and_repaints_the_masked_one(pipe, monkeypatch):
    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half
    final, decode = {}, pipe.decode

    def keep_final(latents):
        final["latents"] = latents.clone()
        return decode(latents)

    monkeypatch.setattr(pipe, "decode", keep_final)
    image = pipe("a circle", steps=4, seed=3, sampler="euler", init_image=init, mask=mask)[0]
    known = pipe.encode_image(to_tensor(init), [torch.Generator().manual_seed(3)])
    latents, half = final["latents"], known.shape[-1] // 2
    assert torch.allclose(latents[..., half:], known[..., half:], atol=1e-4)  # kept (fp32 rounding, any threads)
    assert (latents[..., :half] - known[..., :half]).abs().mean() > 0.5  # repainted
    assert torch.equal(pixels([image]), pixels(to_pil(decode(latents))))


def test_lora_changes_output_and_is_removed_afterwards(pipe, tmp_path):
    network = create_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, rank=2)
    torch.manual_seed(1)
    for layer in network.layers().values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.5)
    path = tmp_path / "style.safetensors"
    save_lora(network, path)
    before = pixels(pipe("a red circle", steps=3, seed=4))
    pipe.loras = [(path, 1.0)]
    with_lora = pixels(pipe("a red circle", steps=3, seed=4))
    pipe.loras = [(path, 0.0)]
    weight_zero = pixels(pipe("a red circle", steps=3, seed=4))
    pipe.loras = []
    pipe.lora_dir = tmp_path
    tagged = pixels(pipe("a red circle <lora:style:1>", steps=3, seed=4))
    pipe.lora_dir = None
    after = pixels(pipe("a red circle", steps=3, seed=4))
    assert not torch.equal(before, with_lora)
    assert torch.equal(with_lora, tagged)
    assert (before - weight_zero).abs().max() <= 1
    assert torch.equal(before, after)


def test_callback_sees_every_step_and_can_interrupt(pipe):
    seen = []
    pipe("a red circle", steps=5, seed=1, sampler="euler", callback=lambda i, n, x0: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]

    def stop(i, n, x0):
        raise Interrupted

    with pytest.raises(Interrupted):
        pipe("a red circle", steps=5, seed=1, callback=stop)


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=30), "multiple of 8"),
    (dict(height=0), "multiple of 8"),
    (dict(sampler="nope"), "unknown sampler 'nope'"),
    (dict(steps=0), "steps"),
    (dict(batch=0), "batch"),
    (dict(schedule="zigzag"), "zigzag"),
    (dict(mask=Image.new("L", (SIZE, SIZE))), "init image"),
    (dict(init_image=Image.new("RGB", (SIZE, SIZE)), strength=1.5), "strength"),
    (dict(sampler="ddim", eta=-1.0), "eta"),
])
def test_bad_settings_give_one_clear_error(pipe, kwargs, message):
    with pytest.raises(NanoDiffusionError, match=message):
        pipe("a red circle", **{"steps": 3, **kwargs})


def test_prompt_lora_tag_without_folder_is_a_clear_error(pipe):
    with pytest.raises(NanoDiffusionError, match="LoRA folder"):
        pipe("a circle <lora:x:1>", steps=2)


def test_eta_reaches_samplers_that_have_it_and_is_ignored_by_the_rest(pipe):
    ddim0 = pixels(pipe("a red circle", steps=4, seed=3, sampler="ddim", eta=0.0))
    ddim1 = pixels(pipe("a red circle", steps=4, seed=3, sampler="ddim", eta=1.0))
    assert not torch.equal(ddim0, ddim1)
    assert torch.equal(ddim0, pixels(pipe("a red circle", steps=4, seed=3, sampler="ddim")))
    assert torch.equal(pixels(pipe("a red circle", steps=4, seed=3, sampler="euler", eta=0.5)),
                       pixels(pipe("a red circle", steps=4, seed=3, sampler="euler")))


def test_prompt_warnings_name_what_the_model_will_not_read(pipe):
    with pytest.warns(PromptWarning, match="unknown|not know") as caught:
        pipe("a zebra circle", steps=1, seed=0)
    assert "zebra" in str(caught[0].message)
    with pytest.warns(PromptWarning, match="empty prompt"):
        pipe("", steps=1, seed=0)
    with pytest.warns(PromptWarning, match="chunks"):
        pipe("circle " * (pipe.tokenizer.model_max_length + 5), steps=1, seed=0)


def test_uninitialised_build_loads_the_same_model():
    """Networks are built without their random init (storage.uninitialised) and take the checkpoint's tensors: the
    same network as an ordinarily built one that loads them, with real (not meta) buffers."""
    from nanodiffusion.storage import uninitialised

    pipe = Pipeline.load()
    weights = pipe.unet.state_dict()
    with uninitialised():
        untouched = torch.zeros(3)
        torch.nn.init.ones_(untouched)
        fast = type(pipe.unet)(pipe.unet.config)
    assert not untouched.any() and not any(t.is_meta for t in [*fast.parameters(), *fast.buffers()])
    ordinary = type(pipe.unet)(pipe.unet.config)
    fast.load_state_dict(weights, assign=True)
    ordinary.load_state_dict(weights)
    x, t = torch.randn(1, pipe.unet.config.in_channels, 8, 8), torch.tensor([500])
    context = torch.randn(1, 3, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(fast(x, t, context), ordinary(x, t, context))
