"""Lesson `controlnet`: a ControlNet (Zhang et al. 2023) trained for a few minutes on layout masks of the shapes
scenes, and what its control signal changes in the built-in model's images."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..controlnet_files import load_controlnet
from ..data.shapes import BACKGROUND
from ..images import image_grid
from ..train.controlnet import preview_cases, train_controlnet
from ..train.loop import TrainConfig
from .builtin import load
from .report import Page, pyplot

SCALES, STEPS, TRAIN_STEPS = (0.0, 1.0, 2.0), 20, 200


def foreground_iou(image, mask) -> float:
    """IoU of the image's non-background pixels with the mask's white pixels."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    drawn = np.linalg.norm(rgb - np.array(BACKGROUND), axis=-1) > 60
    wanted = np.asarray(mask.convert("L").resize(image.size)) > 127
    return float((drawn & wanted).sum() / max((drawn | wanted).sum(), 1))


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("A ControlNet is a trainable copy of the UNet's encoder that reads an extra image (here a layout mask: "
              "where the objects go) and adds its features to the frozen UNet's skip connections through "
              "zero-initialised convolutions, so training starts from the unchanged model:")
    page.equation(r"\epsilon = \mathrm{UNet}\big(z_t, t, c;\ \text{skips} + s\cdot Z(\mathrm{ControlNet}(z_t, t, c, "
                  r"\text{mask}))\big),\qquad Z = \text{zero convolutions at init}")
    page.code("models/controlnet.py:ControlNetModel", "models/controlnet.py:controlnet_unet",
              "train/controlnet.py:train_controlnet")
    pipe = load()
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(output=Path(run_dir), steps=TRAIN_STEPS, batch_size=8, lr=5e-4, warmup=10,
                             preview_every=0, checkpoint_every=10**9, log_every=20, ema_decay=0.0)
        folder = train_controlnet(config, dataset_size=256)
        controlnet = load_controlnet(folder)
    cases = preview_cases(4)
    rows, tiles = [], []
    for i, (_, text, mask) in enumerate(cases):
        tiles.append(mask)
        plain = pipe(text, steps=STEPS, sampler="euler", seed=i)[0]
        tiles.append(plain)
        row = [text, foreground_iou(plain, mask)]
        for scale in SCALES[1:]:
            image = pipe(text, steps=STEPS, sampler="euler", seed=i, controlnet=controlnet, control_image=mask,
                         control_scale=scale)[0]
            tiles.append(image)
            row.append(foreground_iou(image, mask))
        rows.append(row)
    page.image(image_grid(tiles, columns=2 + len(SCALES) - 1), "control",
               "Each row: the layout mask, the image without ControlNet, with it at scale "
               f"{', '.join(f'{s:g}' for s in SCALES[1:])} (same seed)")
    means = [sum(r[k] for r in rows) / len(rows) for k in range(1, len(SCALES) + 1)]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar([f"scale {s:g}" for s in SCALES], means)
    ax.set(ylabel="IoU(objects, mask)", title="layout followed")
    page.figure(fig, "iou", "Mean IoU between the drawn objects and the mask, by control scale (0 = no ControlNet)")
    page.table(["prompt"] + [f"IoU, scale {s:g}" for s in SCALES], rows)
    page.text(f"Trained for {TRAIN_STEPS} steps of batch 8 on 256 scenes (minutes on a CPU; docs/controlnet.md "
              "reports a full run). The control signal moves objects towards the masked regions; the text still "
              "decides colour and shape.")
    return page.write()
