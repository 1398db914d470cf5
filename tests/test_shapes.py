"""The synthetic captioned shapes: deterministic, captions say exactly the scene, held-out split holds."""

import json
import random

import numpy as np
import pytest
import torch

from nanodiffusion.data.captions import COLORS, KINDS, RELATIONS, SHAPES, VOCABULARY, Prompt, caption, parse_caption
from nanodiffusion.data.shapes import (BACKGROUND, GAP, HELDOUT_PAIRS, HELDOUT_RELATIONS, MARGIN, PALETTE,
                                       CodecDataset, ShapesDataset, codec_color, heldout_prompts, is_heldout,
                                       relation_holds, render, sample_prompts, sample_scene, write_dataset)
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.evaluate import PALETTE_NAMES, detect, nearest_hue
from nanodiffusion.images import to_pil


def scenes(n, split, seed=0):
    rng = random.Random(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def test_same_seed_same_scene_caption_and_pixels():
    a, b = ShapesDataset(20, seed=3), ShapesDataset(20, seed=3)
    for i in (0, 7, 19):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
    other = ShapesDataset(20, seed=4)
    assert any(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(20))


def test_dataset_item_format():
    item = ShapesDataset(5, size=32)[2]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert isinstance(item["caption"], str) and item["caption"]
    with pytest.raises(IndexError):
        ShapesDataset(5)[5]
    with pytest.raises(NanoDiffusionError, match="split"):
        ShapesDataset(5, split="test")


def test_captions_parse_back_to_exactly_the_scene_prompt():
    rng = random.Random(1)
    for scene in scenes(600, "all"):
        text = caption(scene.prompt, rng)
        assert parse_caption(text) == scene.prompt, text
        assert set(text.split()) <= set(VOCABULARY)
    assert {s.kind for s in scenes(200, "all")} == set(KINDS)


def test_scene_objects_realise_the_prompt():
    for scene in scenes(600, "all"):
        prompt = scene.prompt
        assert len(scene.objects) == len(prompt.objects) <= 4
        for obj, (shape, color) in zip(scene.objects, prompt.objects):
            assert obj.shape == shape and color in (None, obj.color)
        if prompt.kind == "counting":
            assert len({(o.shape, o.color) for o in scene.objects}) == 1
        if prompt.kind in ("two", "color_attr"):
            assert scene.objects[0].shape != scene.objects[1].shape
        if prompt.kind == "color_attr":
            assert scene.objects[0].color != scene.objects[1].color
        if prompt.relation:
            a, b = scene.objects[:2]
            assert relation_holds(prompt.relation, (a.cx, a.cy), (b.cx, b.cy))
            assert not relation_holds(prompt.relation, (b.cx, b.cy), (a.cx, a.cy))


def test_layout_margins_and_gaps():
    for scene in scenes(600, "all"):
        for i, a in enumerate(scene.objects):
            assert MARGIN - 1e-9 <= a.cx - a.size and a.cx + a.size <= 1 - MARGIN + 1e-9
            assert MARGIN - 1e-9 <= a.cy - a.size and a.cy + a.size <= 1 - MARGIN + 1e-9
            for b in scene.objects[i + 1:]:
                reach = a.size + b.size + GAP
                assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def test_train_split_never_shows_a_heldout_composition():
    for scene in scenes(2000, "train"):
        assert not is_heldout(scene.prompt)
        assert not any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects)


def test_the_autoencoders_recoloured_scenes_never_show_a_heldout_pair():
    rng = random.Random(0)
    for shape in SHAPES:
        fills = np.array([codec_color(rng, shape) for _ in range(1500)])
        named = {PALETTE_NAMES[i - 1] for i in nearest_hue(fills)}
        assert named == set(COLORS) - {color for color, held in HELDOUT_PAIRS if held == shape}, shape
    data, plain = CodecDataset(200, seed=1), ShapesDataset(200, seed=1)
    assert torch.equal(data[4]["image"], plain[4]["image"])
    assert not torch.equal(data[5]["image"], plain[5]["image"])
    for index in range(1, 200, 2):
        found = {(d.color, d.shape) for d in detect(to_pil(data[index]["image"][None])[0])}
        assert not found & HELDOUT_PAIRS, (index, found)


def test_heldout_split_always_names_one_with_training_words_only():
    rng = random.Random(2)
    train_words = {word for _ in range(3000) for word in caption(sample_scene(rng, "train").prompt, rng).split()}
    pairs, relations = set(), set()
    for prompt, text in heldout_prompts(300, seed=0):
        assert is_heldout(prompt) and parse_caption(text) == prompt
        assert set(text.split()) <= train_words, text
        pairs |= {(c, s) for s, c in prompt.objects} & HELDOUT_PAIRS
        if prompt.relation:
            relations.add((prompt.objects[0][0], prompt.relation, prompt.objects[1][0]))
    assert pairs == HELDOUT_PAIRS
    assert relations & HELDOUT_RELATIONS
    assert heldout_prompts(12, seed=5) == heldout_prompts(12, seed=5)
    assert {p.kind for p, _ in sample_prompts(12, split="train")} == set(KINDS)


def test_grammar_words_are_the_vocabulary():
    assert set(COLORS) | set(SHAPES) | {"and", "above", "below", "left", "right"} <= set(VOCABULARY)
    assert len(VOCABULARY) == len(set(VOCABULARY)) < 40
    assert len(RELATIONS) == 4 and len(COLORS) >= 6 and len(SHAPES) >= 4


def test_render_draws_flat_antialiased_colours():
    scene = sample_scene(random.Random(0), "all", kind="colors")
    pixels = np.asarray(render(scene, 64)).reshape(-1, 3)
    obj = scene.objects[0]
    assert render(scene, 64).size == (64, 64)
    assert (pixels == BACKGROUND).all(1).mean() > 0.5
    assert (pixels == PALETTE[obj.color]).all(1).sum() > 0.5 * (obj.size * 64 * 2) ** 2 * 0.4
    edge = ~(pixels == BACKGROUND).all(1) & ~(pixels == PALETTE[obj.color]).all(1)
    assert edge.sum() > 10  # anti-aliased boundary pixels between the two flat colours


def test_palette_hues_are_well_separated():
    from nanodiffusion.evaluate import PALETTE_HUES

    hues = np.sort(PALETTE_HUES)
    gaps = np.diff(np.concatenate([hues, hues[:1] + 360]))
    assert gaps.min() > 40


def test_parse_caption_rejects_text_outside_the_grammar():
    for text in ("a dog", "a huge red circle", "three red circle", "a red circles", "two red circles and a star",
                 "a red circle and a blue square and a star", ""):
        with pytest.raises(NanoDiffusionError, match="shapes prompt"):
            parse_caption(text)
    assert parse_caption("A Red Circle, above a blue square.") == Prompt(
        "position", (("circle", "red"), ("square", "blue")), "above")
    assert parse_caption("three stars") == Prompt("counting", (("star", None),) * 3)


def test_sample_scene_rejects_unknown_kind_or_split():
    with pytest.raises(NanoDiffusionError, match="kind"):
        sample_scene(random.Random(0), "heldout", kind="single")
    with pytest.raises(NanoDiffusionError, match="split"):
        sample_scene(random.Random(0), "dev")


def test_write_dataset_matches_the_dataset(tmp_path):
    from nanodiffusion.data.folder import ImageFolderDataset

    write_dataset(tmp_path, 6, seed=2, split="heldout")
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(parse_caption(e["text"]).kind == e["prompt"]["kind"] for e in lines)
    folder, generated = ImageFolderDataset(tmp_path), ShapesDataset(6, seed=2, split="heldout")
    for i in range(6):
        assert folder[i]["caption"] == generated[i]["caption"]
        assert torch.allclose(folder[i]["image"], generated[i]["image"])
