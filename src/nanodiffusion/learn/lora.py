"""Lesson `lora`: a LoRA (Hu et al. 2021) fine-tuned for a few minutes on the built-in model, and what the low-rank
update changes: its images at several weights and the spectrum of the weight change."""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ..data.captions import parse_caption
from ..data.shapes import caption, render, sample_scene
from ..evaluate import detect, score
from ..images import image_grid
from ..lora_files import load_lora
from ..train.finetune import finetune
from .builtin import load
from .report import Page, pyplot

STYLE, WEIGHTS, STEPS, TRAIN_STEPS = "purple", (0.0, 0.5, 1.0), 20, 100
PROMPTS = ("a red circle", "a blue square above a yellow star", "two green triangles", "a purple star")


def write_style_scenes(folder: Path, n: int = 32) -> Path:
    """n shapes scenes with every object drawn in STYLE, captioned as usual (colour words included), in
    metadata.jsonl with each scene's object boxes (so a layout model is fine-tuned on a slot map of where the
    objects really are): the 'style' the LoRA learns is to paint everything in that colour whatever the prompt
    says."""
    rng = random.Random("lora-style")
    lines = []
    for i in range(n):
        scene = sample_scene(rng, "train")
        styled = replace(scene, objects=tuple(replace(obj, color=STYLE) for obj in scene.objects))
        render(styled, 64).save(folder / f"{i:03d}.png")
        boxes = [[round(v, 4) for v in (obj.cx, obj.cy, obj.size)] for obj in scene.objects]
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption(scene.prompt, rng), "boxes": boxes}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def style_share(image) -> float:
    """Share of the objects the evaluator detects that have the LoRA's colour."""
    found = detect(image)
    return sum(d.color == STYLE for d in found) / len(found) if found else 0.0


def drawn_in_style(image, text: str) -> bool:
    """Whether the evaluator finds exactly the prompt's objects (shapes, count, relation), all in the LoRA's colour."""
    prompt = parse_caption(text)
    return score(image, replace(prompt, objects=tuple((shape, STYLE) for shape, _ in prompt.objects)))["correct"]


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("LoRA freezes the model and learns, for each chosen linear layer, a low-rank change B A "
              "(rank r much smaller than the layer). At run time it is added with a weight; 0 is the base model:")
    page.equation(r"W' = W + w\,\frac{\alpha}{r}\,BA,\qquad B\in\mathbb{R}^{d\times r},\ A\in\mathbb{R}^{r\times k},"
                  r"\ B_0 = 0")
    page.code("models/lora.py:LoRALayer", "models/lora.py:create_lora", "train/finetune.py:finetune",
              "lora_files.py:load_lora")
    pipe = load()
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        data.mkdir()
        write_style_scenes(data)
        path = finetune("lora", data=data, output=Path(work) / "run", steps=TRAIN_STEPS, batch_size=8, rank=4,
                        checkpoint_every=10**9, preview_every=0, log_every=25)
        tiles, rows = [], []
        for i, text in enumerate(PROMPTS):
            row = [text]
            for weight in WEIGHTS:
                image = pipe(text, steps=STEPS, sampler="euler", seed=i, loras=[(path, weight)] if weight else [])[0]
                tiles.append(image)
                row.append(style_share(image))
            rows.append(row + ["yes" if drawn_in_style(tiles[-1], text) else "no"])
        network = load_lora(path, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
        name, layer = max(network.layers().items(), key=lambda item: item[1].delta_weight().numel())
        delta = layer.delta_weight().detach().flatten(1).float()
        base = network.targets[name].weight.detach().flatten(1).float()
    page.image(image_grid(tiles, columns=len(WEIGHTS)), "weights",
               f"Rows: {'; '.join(PROMPTS)}. Columns: LoRA weight {', '.join(f'{w:g}' for w in WEIGHTS)} (same seed)")
    page.table(["prompt"] + [f"share of {STYLE} objects, weight {w:g}" for w in WEIGHTS]
               + [f"weight {WEIGHTS[-1]:g}: the prompt's shapes, all {STYLE}"], rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.semilogy(torch.linalg.svdvals(base).clamp(min=1e-12), "o-", ms=3, label="base weight W")
    ax.semilogy(torch.linalg.svdvals(delta).clamp(min=1e-12), "o-", ms=3, label="LoRA change BA")
    ax.set(xlabel="singular value index", ylabel="singular value", title=name, ylim=(1e-6, None))
    ax.legend()
    page.figure(fig, "spectrum", f"Singular values of one layer's weight and of its learned change: the change has "
                                 f"rank {int((torch.linalg.svdvals(delta) > 1e-6 * torch.linalg.svdvals(delta)[0]).sum())}")
    page.text(f"Fine-tuned for {TRAIN_STEPS} steps of batch 8 on 32 scenes whose objects are all {STYLE} (captions "
              "unchanged; each scene's object boxes in metadata.jsonl, so the built-in model's layout stage paints "
              f"its slot map where the objects are). {len(network.layers())} layers carry a rank-4 change; its "
              "weight at run time blends between the base model (0) and the learned style (1).")
    return page.write()
