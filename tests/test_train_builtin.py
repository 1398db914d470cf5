"""The shipped built-in model: layout, size, fp16 weights, configs = the recipe, and it generates."""

from __future__ import annotations

import json

from safetensors import safe_open

from nanodiffusion.train.builtin import (BUILTIN_DIR, BUILTIN_LAYOUT, BUILTIN_SCHEDULER, BUILTIN_TEXT_ENCODER,
                                         BUILTIN_UNET, BUILTIN_VAE)

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "layout": "diffusion_pytorch_model.safetensors"}
RECIPES = {"unet": BUILTIN_UNET, "vae": BUILTIN_VAE, "text_encoder": BUILTIN_TEXT_ENCODER, "layout": BUILTIN_LAYOUT}


def test_shipped_folder_is_small_fp16_and_follows_the_recipe():
    total = sum(p.stat().st_size for p in BUILTIN_DIR.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"built-in model is {total / 2**20:.1f} MB"
    for part, filename in WEIGHTS.items():
        config = json.loads((BUILTIN_DIR / part / "config.json").read_text())
        for key, value in RECIPES[part].items():
            if key != "scaling_factor":
                assert config[key] == value, (part, key)
        with safe_open(BUILTIN_DIR / part / filename, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), part
    vae = json.loads((BUILTIN_DIR / "vae" / "config.json").read_text())
    assert 0.05 < vae["scaling_factor"] < 20 and vae["scaling_factor"] != 1.0
    scheduler = json.loads((BUILTIN_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == BUILTIN_SCHEDULER


def test_tokenizer_knows_every_caption_word():
    from nanodiffusion.data.shapes import VOCABULARY, ShapesDataset
    from nanodiffusion.models.word_tokenizer import WordTokenizer

    tokenizer = WordTokenizer.load(BUILTIN_DIR / "tokenizer")
    captions = [ShapesDataset(50, seed=1)[i]["caption"] for i in range(50)]
    assert not any(tokenizer.unknown_words(text) for text in [*VOCABULARY, *captions])
    text_config = json.loads((BUILTIN_DIR / "text_encoder" / "config.json").read_text())
    assert text_config["vocab_size"] == len(tokenizer)


def test_builtin_pipeline_generates_deterministically():
    from nanodiffusion.pipeline import Pipeline

    pipe = Pipeline.load()
    first = pipe("a red circle above a blue square", steps=4, sampler="euler", seed=3)[0]
    again = pipe("a red circle above a blue square", steps=4, sampler="euler", seed=3)[0]
    assert first.size == (64, 64)
    assert first.tobytes() == again.tobytes()
    assert len(set(first.tobytes()[i:i + 3] for i in range(0, 64 * 64 * 3, 3))) > 10  # not a flat colour


def test_the_one_command_trains_all_three_stages_and_ships_a_loadable_model(tmp_path):
    """`nanodiff train builtin train` end to end (the real recipe's networks, a few steps of each stage)."""
    from nanodiffusion.pipeline import Pipeline
    from nanodiffusion.train.builtin import main

    ship = tmp_path / "shipped"
    main(["train", "--output", str(tmp_path / "run"), "--vae-steps", "2", "--diffusion-steps", "2",
          "--layout-steps", "2", "--dataset-size", "64", "--threads", "1", "--ship-to", str(ship)])
    for stage in ("vae", "diffusion", "layout"):
        assert (tmp_path / "run" / stage / "log.csv").is_file(), stage
    pipe = Pipeline.load(ship)
    assert pipe.layout is not None and pipe.default_cfg == 3.0
    assert pipe("a red circle above a blue square", steps=2, seed=0)[0].size == (64, 64)

    # stage 3 alone on any pipeline folder keeps that folder's own default guidance (the few-step student's cfg 1)
    from nanodiffusion.train.layout import main as train_layout_main

    index = json.loads((ship / "model_index.json").read_text())
    index["_nanodiffusion"]["default_cfg"] = 1.0
    (ship / "model_index.json").write_text(json.dumps(index))
    train_layout_main([str(ship), "--output", str(tmp_path / "again"), "--steps", "1", "--dataset-size", "64",
                       "--threads", "1"])
    assert Pipeline.load(tmp_path / "again" / "model").default_cfg == 1.0
