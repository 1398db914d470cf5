"""The compositional evaluator: right on ground truth, rejects wrong images, tolerant of blur and noise."""

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter, PngImagePlugin

from nanodiffusion.data.captions import COLORS, KINDS, SHAPES, Prompt, caption
from nanodiffusion.data.shapes import realize, render, sample_scene
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.evaluate import (Detection, connected_components, detect, evaluate, evaluate_folder,
                                    format_table, score)
from oracles import require


def ground_truth(n, seed):
    """n scenes cycling through every kind, alternating the train and held-out splits."""
    rng = random.Random(seed)
    heldout_kinds = ("counting", "colors", "position", "color_attr")
    return [sample_scene(rng, "heldout", heldout_kinds[i // 2 % 4]) if i % 2
            else sample_scene(rng, "train", KINDS[i // 2 % 6]) for i in range(n)]


def accuracy(scenes, degrade=lambda image: image):
    results = evaluate([degrade(render(scene)) for scene in scenes], scenes)
    print(format_table(results))
    return results


def test_connected_components_match_scipy():
    scipy_label = require("scipy.ndimage").label
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (64, 64)) * (rng.random((64, 64)) < 0.7)
    ours = connected_components(labels)
    count = 0
    for value in (1, 2):
        theirs, n = scipy_label(labels == value)
        count += n
        for k in range(1, n + 1):
            assert len(np.unique(ours[theirs == k])) == 1
    assert len(np.unique(ours[ours >= 0])) == count
    assert (ours[labels == 0] == -1).all()


def test_detect_finds_each_object():
    rng = random.Random(4)
    for _ in range(30):
        scene = sample_scene(rng, "all")
        found = detect(render(scene))
        assert all(isinstance(d, Detection) for d in found)
        assert Counter((d.shape, d.color) for d in found) == Counter((o.shape, o.color) for o in scene.objects)
        for obj in scene.objects:
            assert min(abs(d.cx - obj.cx) + abs(d.cy - obj.cy) for d in found) < 0.03
    assert detect(Image.new("RGB", (64, 64), (235, 235, 235))) == []


def test_ground_truth_is_scored_correct_in_every_category():
    results = accuracy(ground_truth(360, seed=0))
    assert set(results["categories"]) == set(KINDS)
    assert sum(c["total"] for c in results["categories"].values()) == 360
    for kind, row in results["categories"].items():
        assert row["accuracy"] >= 0.98, (kind, row)
    assert results["overall"] >= 0.98


@pytest.mark.parametrize("name, degrade", [
    ("blur 1.0", lambda image: image.filter(ImageFilter.GaussianBlur(1.0))),
    ("blur 1.5", lambda image: image.filter(ImageFilter.GaussianBlur(1.5))),
    ("noise 20", lambda image: Image.fromarray(np.clip(
        np.asarray(image) + np.random.default_rng(0).normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8))),
    ("upscaled 128 px, blur 2", lambda image: image.resize((128, 128), Image.Resampling.BICUBIC).filter(
        ImageFilter.GaussianBlur(2.0))),
])
def test_blurred_or_noisy_ground_truth_still_scores(name, degrade):
    results = accuracy(ground_truth(300, seed=1), degrade)
    assert results["overall"] >= 0.9, name
    assert min(row["accuracy"] for row in results["categories"].values()) >= 0.85, name


def other(choices, value, rng):
    return rng.choice([c for c in choices if c != value])


def wrong_color(scene, rng):
    """Recolour one object whose colour the prompt names."""
    named = [i for i, (_, color) in enumerate(scene.prompt.objects) if color]
    if not named:
        return None
    i = rng.choice(named)
    objects = list(scene.objects)
    objects[i] = replace(objects[i], color=other(COLORS, objects[i].color, rng))
    return replace(scene, objects=tuple(objects))


def wrong_shape(scene, rng):
    objects = list(scene.objects)
    i = rng.randrange(len(objects))
    objects[i] = replace(objects[i], shape=other(SHAPES, objects[i].shape, rng))
    return replace(scene, objects=tuple(objects))


def wrong_count(scene, rng):
    """One object fewer (or one more, for a single object), laid out afresh."""
    objects = scene.prompt.objects
    objects = objects[:-1] if len(objects) > 1 else objects * 2
    return realize(Prompt("counting", objects), rng)


def swapped_relation(scene, rng):
    if scene.prompt.relation is None:
        return None
    a, b = scene.objects[:2]
    return replace(scene, objects=(replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)))


def swapped_binding(scene, rng):
    if scene.prompt.kind != "color_attr":
        return None
    a, b = scene.objects
    return replace(scene, objects=(replace(a, color=b.color), replace(b, color=a.color)))


@pytest.mark.parametrize("corrupt", [wrong_color, wrong_shape, wrong_count, swapped_relation, swapped_binding])
def test_wrong_images_are_rejected(corrupt):
    rng = random.Random(7)
    rejected = total = 0
    for scene in ground_truth(400, seed=2):
        wrong = corrupt(scene, rng)
        if wrong is None:
            continue
        total += 1
        rejected += not score(render(wrong), scene.prompt)["correct"]
    print(f"{corrupt.__name__}: rejected {rejected}/{total}")
    assert total >= 60
    assert rejected / total >= 0.95


def test_score_explains_and_accepts_captions():
    scene = realize(Prompt("position", (("circle", "red"), ("square", "blue")), "above"), random.Random(0))
    image = render(scene)
    result = score(image, "a red circle above a blue square")
    assert result == {"correct": True, "category": "position", "reason": "found " + result["reason"][6:]}
    swapped = score(image, "a blue square above a red circle")
    assert not swapped["correct"] and "is not above" in swapped["reason"]
    counted = score(image, "three red circles")
    assert not counted["correct"] and "expected 3 object(s)" in counted["reason"]


def png_with_prompt(path, image, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{text}\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 1")
    image.save(path, pnginfo=info)


def test_evaluate_folder_reads_png_parameters_and_txt(tmp_path):
    rng = random.Random(3)
    scenes = ground_truth(12, seed=3)
    for i, scene in enumerate(scenes):
        text = caption(scene.prompt, rng)
        if i % 2:
            png_with_prompt(tmp_path / f"{i:02d}.png", render(scene), text)
        else:
            render(scene).save(tmp_path / f"{i:02d}.png")
            (tmp_path / f"{i:02d}.txt").write_text(text)
    wrong = sample_scene(rng, "all", kind="colors")
    png_with_prompt(tmp_path / "wrong.png", render(wrong_shape(wrong, rng)), caption(wrong.prompt, rng))
    Image.new("RGB", (64, 64)).save(tmp_path / "no_prompt.png")
    with pytest.warns(UserWarning, match="no_prompt.png"):
        results = evaluate_folder(tmp_path)
    assert len(results["items"]) == 13
    assert [item["file"] for item in results["items"] if not item["correct"]] == ["wrong.png"]
    table = format_table(results)
    assert "| colors |" in table and "**overall**" in table and "| 13 |" in table


def test_evaluate_folder_without_shapes_prompts_is_an_error(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of an astronaut riding a horse")
    with pytest.warns(UserWarning), pytest.raises(NanoDiffusionError, match="no image in"):
        evaluate_folder(tmp_path)


def test_evaluate_counts_each_heldout_pair_a_prompt_names():
    rng = random.Random(5)
    green_squares = Prompt("counting", (("square", "green"),) * 2)
    right, recoloured = realize(green_squares, rng), realize(green_squares, rng)
    recoloured = replace(recoloured, objects=tuple(replace(o, color="cyan") for o in recoloured.objects))
    mixed = realize(Prompt("color_attr", (("circle", "yellow"), ("star", "blue"))), rng)
    seen = realize(Prompt("colors", (("circle", "red"),)), rng)
    results = evaluate([render(s) for s in (right, recoloured, mixed, seen)], [right, recoloured, mixed, seen])
    assert results["pairs"] == {"green square": {"correct": 1, "total": 2, "accuracy": 0.5},
                                "yellow circle": {"correct": 1, "total": 1, "accuracy": 1.0}}
    table = format_table(results)
    assert "| green square | 1 | 2 | 50.0% |" in table and "| yellow circle | 1 | 1 | 100.0% |" in table
    assert "held-out pair" not in format_table(evaluate([render(seen)], [seen]))
