"""Control images of a shapes scene, for training and testing a ControlNet (Zhang, Rao & Agrawala 2023).

The layout mask: every object's silhouette filled white on black, drawn with the scene renderer's shapes,
boxes and anti-aliasing (shapes.draw_shape at SUPERSAMPLE x, box-filtered down), so it matches the render
pixel for pixel but carries no colour: the mask says where and what shape, the prompt says which colours.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import to_tensor
from .captions import Prompt
from .shapes import INVERSE, SUPERSAMPLE, Scene, ShapesDataset, draw_shape, example, realize


def layout_mask(scene: Scene, size: int = 64) -> Image.Image:
    """RGB size x size: the objects' shapes in white (anti-aliased as render() draws them) on black."""
    big = size * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        box = ((obj.cx - obj.size) * big, (obj.cy - obj.size) * big,
               (obj.cx + obj.size) * big - 1, (obj.cy + obj.size) * big - 1)
        draw_shape(draw, obj.shape, box, 255)
    return image.reduce(SUPERSAMPLE).convert("RGB")


def prompt_scene(prompt: Prompt, seed: int) -> Scene:
    """A fresh random scene realising `prompt` (seeded): the layout a user might sketch for it."""
    return realize(prompt, random.Random(f"layout:{seed}"))


def prompt_layout(prompt: Prompt, seed: int, size: int = 64) -> Image.Image:
    """The layout mask of prompt_scene(prompt, seed)."""
    return layout_mask(prompt_scene(prompt, seed), size)


def inverted(prompt: Prompt) -> Prompt:
    """The prompt with its relation inverted (left of <-> right of, above <-> below)."""
    return Prompt(prompt.kind, prompt.objects, INVERSE[prompt.relation]) if prompt.relation else prompt


def swapped(scene: Scene) -> Scene:
    """The first two objects trade places (centres; each keeps its shape, colour and size): the relation of the
    layout is inverted while every shape stays upright. Centre distances are unchanged, so nothing overlaps."""
    if len(scene.objects) < 2:
        return scene
    a, b, *rest = scene.objects
    moved = (replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy), *rest)
    return replace(scene, objects=moved, prompt=inverted(scene.prompt))


class LayoutDataset(ShapesDataset):
    """ShapesDataset items plus "layout": the layout mask of the same scene, one uint8 channel [H, W]."""

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene, text, image = example(self.seed, self.split, index, self.size)
        layout = np.asarray(layout_mask(scene, self.size).getchannel(0))
        return {"image": to_tensor(image)[0], "caption": text, "layout": torch.from_numpy(layout.copy())}
