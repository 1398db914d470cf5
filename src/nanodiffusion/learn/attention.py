"""Lesson `attention`: the built-in model's cross-attention maps per prompt token over the denoising steps (how
the text reaches the pixels: softmax(Q K^T / sqrt(d)) V with Q from the image, K, V from the text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.shapes import PALETTE
from ..models.attention_maps import AttentionMaps
from .builtin import load, token_labels
from .report import Page, pyplot

PROMPT, SEED, STEPS = "a red circle above a blue square", 0, 20
WORDS = ("red", "circle", "blue", "square")


def step_maps(pipe, prompt: str, seed: int, steps: int):
    """Generate `prompt`; returns the image and, per step, the conditional branch's per-token maps (tokens, h, w)."""
    side = pipe.default_size // pipe.vae_scale
    maps: list[torch.Tensor] = []
    with AttentionMaps(pipe.unet) as recorder:
        def on_step(i: int, sigma: float, x: torch.Tensor, x0: torch.Tensor) -> None:
            maps.append(recorder.token_maps(side, side, slice(-1, None))[0])
            recorder.clear()

        image = pipe(prompt, steps=steps, sampler="euler", seed=seed, step_callback=on_step)[0]
    return image, maps


def colour_mask(image, color: str, side: int) -> torch.Tensor:
    """Where the image shows `color` (RGB distance < 90), pooled to side x side."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = torch.from_numpy((np.linalg.norm(rgb - np.array(PALETTE[color]), axis=-1) < 90).astype(np.float32))
    return torch.nn.functional.adaptive_avg_pool2d(mask[None, None], side)[0, 0]


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("Every spatial transformer of the UNet lets each latent pixel (query) attend to the prompt's tokens "
              "(keys and values from the text encoder). The attention probabilities say, for every pixel, how much "
              "it reads each word. Averaged over heads and layers, they form one heatmap per token:")
    page.equation(r"A = \mathrm{softmax}\!\big(QK^\top/\sqrt{d}\big),\ Q = W_q\,h_{pixels},\ K = W_k\,c_{tokens},"
                  r"\qquad \mathrm{out} = A\,V")
    page.code("models/attention.py:Attention", "models/attention_maps.py:AttentionMaps",
              "pipeline.py:Pipeline.__call__ (step_callback)")
    pipe = load()
    image, maps = step_maps(pipe, PROMPT, SEED, STEPS)
    labels = dict((name, position) for position, name in token_labels(pipe.tokenizer, PROMPT))
    words = [word for word in WORDS if word in labels]
    shown = sorted({0, STEPS // 4, STEPS // 2, 3 * STEPS // 4, STEPS - 1})
    fig, axes = plt.subplots(len(shown), len(words) + 1, figsize=(2.2 * (len(words) + 1), 2.2 * len(shown)))
    for row, step in enumerate(shown):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(f"step {step + 1}")
        for col, word in enumerate(words, 1):
            heat = maps[step][labels[word]]
            axes[row, col].imshow(image, alpha=0.35)
            axes[row, col].imshow(heat, cmap="inferno", alpha=0.75, extent=(-0.5, image.width - 0.5,
                                                                            image.height - 0.5, -0.5))
            axes[row, col].set_title(f'"{word}"' if row == 0 else "")
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    page.figure(fig, "maps", f'Cross-attention of "{PROMPT}" per token (columns) at steps {", ".join(str(s + 1) for s in shown)} '
                             f"of {STEPS} (rows), over the final image")
    side = maps[0].shape[-1]
    rows = []
    final = torch.stack(maps[STEPS // 2:]).mean(0)
    for word, color in (("red", "red"), ("circle", "red"), ("blue", "blue"), ("square", "blue")):
        if word not in labels:
            continue
        mask = colour_mask(image, color, side)
        heat = final[labels[word]]
        rows.append([f'"{word}"', f"{color} object", float((heat * mask).sum() / heat.sum()), float(mask.mean())])
    page.table(["token", "region", "share of the token's attention in the region (2nd half of the steps)",
                "region's share of the image"], rows)
    page.text("A token attends to its object when its share is well above the region's share of the image (what a "
              "uniform map would give). Early steps spread attention widely; once the layout is decided, the "
              "colour and shape words concentrate on their objects.")
    return page.write()
