"""Synthetic captioned shapes: the built-in model's training data, learnable at toy scale.

A scene is a structured prompt (captions.py) realised as 1-4 large, flat-coloured, well-separated
shapes on a plain light-gray background. Six colours of maximally separated hue, four shapes that
stay distinct at 64 px, sizes that shrink with the number of objects, and a layout that puts every
object's box at least `GAP` from every other and realises relations with a clear margin.
Some compositions are held out of training (`HELDOUT_PAIRS`, `HELDOUT_RELATIONS`), so the
evaluator can measure whether the model composes words it has seen into scenes it has not.
Everything is a pure function of a `random.Random`, so a seed fixes a scene exactly.
"""

from __future__ import annotations

import colorsys
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import NanoDiffusionError, choice_error
from ..images import to_tensor
from .captions import COLORS, KINDS, RELATIONS, SHAPES, VOCABULARY, Prompt, caption  # noqa: F401 (re-exported)

PALETTE = {  # hues 0, 50, 129, 176, 230, 279 degrees: nearly evenly spaced around the wheel
    "red": (220, 40, 40),
    "yellow": (235, 200, 30),
    "green": (40, 180, 60),
    "cyan": (30, 195, 185),
    "blue": (40, 80, 230),
    "purple": (160, 50, 220),
}
BACKGROUND = (235, 235, 235)
SUPERSAMPLE = 4
MARGIN = 0.04  # free border of the image, as a fraction of its width
GAP = 0.06  # free space between object boxes
RADIUS = {1: (0.18, 0.26), 2: (0.14, 0.19), 3: (0.135, 0.17), 4: (0.125, 0.155)}  # half box side, by object count
SPLITS = ("train", "heldout", "all")
HELDOUT_PAIRS = {("purple", "triangle"), ("yellow", "circle"), ("cyan", "star"), ("green", "square")}
HELDOUT_RELATIONS = {("circle", "above", "square"), ("triangle", "left of", "star"),
                     ("square", "left of", "circle"), ("star", "above", "triangle")}
HELDOUT_KINDS = ("counting", "colors", "position", "color_attr")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _fit_to_box(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale a polygon so its bounding box is exactly [-1, 1] x [-1, 1]."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return tuple((2 * (x - min(xs)) / (max(xs) - min(xs)) - 1, 2 * (y - min(ys)) / (max(ys) - min(ys)) - 1)
                 for x, y in points)


POLYGONS = {  # unit shapes filling the box [-1, 1]^2 (y down); the circle is drawn as an ellipse
    "square": ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)),
    "triangle": ((0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)),
    "star": _fit_to_box([(math.cos(math.radians(-90 + 36 * k)) * (1.0 if k % 2 == 0 else 0.5),
                          math.sin(math.radians(-90 + 36 * k)) * (1.0 if k % 2 == 0 else 0.5)) for k in range(10)]),
}


@dataclass(frozen=True)
class Obj:
    """One shape: its box is centred at (cx, cy) with half side `size`, all as fractions of the image width."""

    shape: str
    color: str
    size: float
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    """Objects on a plain background, and the structured prompt they realise."""

    objects: tuple[Obj, ...]
    prompt: Prompt
    background: tuple[int, int, int] = BACKGROUND

    @property
    def kind(self) -> str:
        return self.prompt.kind


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Fill one shape into the pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        draw.polygon([(cx + x * hx, cy + y * hy) for x, y in POLYGONS[shape]], fill=fill)


def render(scene: Scene, size: int = 64, fills: list[tuple[int, int, int]] | None = None) -> Image.Image:
    """Anti-aliased RGB image: drawn at SUPERSAMPLE x the size, then box-filtered down. Each object is filled with
    its palette colour, or with fills[i] where given (the autoencoder's recoloured scenes)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(scene.objects):
        box = ((obj.cx - obj.size) * big, (obj.cy - obj.size) * big,
               (obj.cx + obj.size) * big - 1, (obj.cy + obj.size) * big - 1)
        draw_shape(draw, obj.shape, box, fills[i] if fills else PALETTE[obj.color])
    return image.reduce(SUPERSAMPLE)


def is_heldout(prompt: Prompt) -> bool:
    """Whether the prompt names a held-out colour-shape pair or a held-out spatial composition."""
    if any((color, shape) in HELDOUT_PAIRS for shape, color in prompt.objects):
        return True
    if prompt.relation is None:
        return False
    (a, _), (b, _) = prompt.objects[:2]
    return (a, prompt.relation, b) in HELDOUT_RELATIONS or (b, INVERSE[prompt.relation], a) in HELDOUT_RELATIONS


def _sample_prompt(rng: random.Random, kind: str) -> Prompt:
    """A random structured prompt of one kind (colours unspecified for single / two)."""
    if kind in ("single", "colors"):
        return Prompt(kind, ((rng.choice(SHAPES), rng.choice(COLORS) if kind == "colors" else None),))
    if kind == "counting":
        return Prompt(kind, ((rng.choice(SHAPES), rng.choice(COLORS)),) * rng.randint(1, 4))
    shapes = rng.sample(SHAPES, 2)
    if kind == "two":
        return Prompt(kind, ((shapes[0], None), (shapes[1], None)))
    if kind == "color_attr":
        return Prompt(kind, tuple(zip(shapes, rng.sample(COLORS, 2))))
    a, b = (rng.choice(SHAPES), rng.choice(COLORS)), (rng.choice(SHAPES), rng.choice(COLORS))
    while b == a:
        b = (rng.choice(SHAPES), rng.choice(COLORS))
    return Prompt(kind, (a, b), rng.choice(RELATIONS))


def _along_across(relation: str, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """How far a lies from b in the relation's direction, and how far off that axis (image y grows down)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    return {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether point a is `relation` of point b: displaced more along that direction than across it."""
    along, across = _along_across(relation, a, b)
    return along > abs(across)


def _clear_of(a: Obj, b: Obj, relation: str | None) -> bool:
    """Boxes at least GAP apart; with a relation, a is that way of b and at most half as far off-axis."""
    reach = a.size + b.size + GAP
    if relation is None:
        return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach
    along, across = _along_across(relation, (a.cx, a.cy), (b.cx, b.cy))
    return along >= reach and abs(across) <= along / 2


def _layout(rng: random.Random, prompt: Prompt, colors: list[str]) -> tuple[Obj, ...]:
    """Place the prompt's objects inside the margin, each clear of the ones before (retry until all fit)."""
    low, high = RADIUS[len(prompt.objects)]
    while True:
        placed: list[Obj] = []
        for (shape, _), color in zip(prompt.objects, colors):
            size = rng.uniform(low, high)
            for _ in range(100):
                obj = Obj(shape, color, size, rng.uniform(size + MARGIN, 1 - size - MARGIN),
                          rng.uniform(size + MARGIN, 1 - size - MARGIN))
                if all(_clear_of(other, obj, prompt.relation if i == 0 else None) for i, other in enumerate(placed)):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == len(prompt.objects):
            return tuple(placed)


def sample_scene(rng: random.Random, split: str = "train", kind: str | None = None) -> Scene:
    """A random scene of the split: train never shows a held-out composition, heldout always names one."""
    if split not in SPLITS:
        raise choice_error("split", split, list(SPLITS))
    kinds = HELDOUT_KINDS if split == "heldout" else KINDS
    if kind is not None and kind not in kinds:
        raise choice_error(f"kind for split {split!r}", kind, list(kinds))
    kind = kind or rng.choice(kinds)
    while True:
        prompt = _sample_prompt(rng, kind)
        if split == "all" or is_heldout(prompt) == (split == "heldout"):
            return realize(prompt, rng, split)


def realize(prompt: Prompt, rng: random.Random, split: str = "all") -> Scene:
    """A random scene showing the prompt; unspecified colours are drawn (in train, never a held-out pair)."""
    colors = [color or rng.choice([c for c in COLORS if split != "train" or (c, shape) not in HELDOUT_PAIRS])
              for shape, color in prompt.objects]
    return Scene(_layout(rng, prompt, colors), prompt)


def scene_caption(seed: int, split: str, index: int) -> tuple[Scene, str]:
    """The index-th scene of a (seed, split) dataset and its caption, without drawing it."""
    rng = random.Random(f"shapes:{seed}:{split}:{index}")
    scene = sample_scene(rng, split)
    return scene, caption(scene.prompt, rng)


def example(seed: int, split: str, index: int, size: int) -> tuple[Scene, str, Image.Image]:
    """The index-th example of a (seed, split) dataset: scene, caption, image."""
    scene, text = scene_caption(seed, split, index)
    return scene, text, render(scene, size)


def scene_boxes(scene: Scene, slots: int = 4) -> list[tuple[float, float, float, float]]:
    """Per object slot, in the prompt's order: (present, centre x, centre y, half side), absent slots zero."""
    boxes = [(1.0, obj.cx, obj.cy, obj.size) for obj in scene.objects]
    return boxes + [(0.0, 0.0, 0.0, 0.0)] * (slots - len(boxes))


ANY_COLOR = len(COLORS)   # the colour class of an object whose colour the prompt leaves open


def scene_labels(scene: Scene, slots: int = 4) -> list[tuple[int, int]]:
    """Per object slot, in the prompt's order: (colour index, ANY_COLOR where the prompt leaves it open, shape
    index); absent slots (-1, -1)."""
    labels = [(COLORS.index(color) if color else ANY_COLOR, SHAPES.index(shape))
              for shape, color in scene.prompt.objects]
    return labels + [(-1, -1)] * (slots - len(labels))


class ShapesDataset(Dataset):
    """`length` captioned scenes; item i is a pure function of (seed, split, i)."""

    def __init__(self, length: int, seed: int = 0, split: str = "train", size: int = 64):
        if split not in SPLITS:
            raise choice_error("split", split, list(SPLITS))
        if length < 1 or size < 8:
            raise NanoDiffusionError(f"shapes dataset needs length >= 1 and size >= 8 (got {length}, {size})")
        self.length, self.seed, self.split, self.size = length, seed, split, size

    def __len__(self) -> int:
        return self.length

    def boxes(self, index: int) -> list[tuple[float, float, float, float]]:
        """Item i's object boxes (scene_boxes), the layout stage's training target."""
        return scene_boxes(scene_caption(self.seed, self.split, index)[0])

    def labels(self, index: int) -> list[tuple[int, int]]:
        """Item i's per-slot (colour, shape) indices (scene_labels)."""
        return scene_labels(scene_caption(self.seed, self.split, index)[0])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        _, text, image = example(self.seed, self.split, index, self.size)
        return {"image": to_tensor(image)[0], "caption": text}


def codec_color(rng: random.Random, shape: str) -> tuple[int, int, int]:
    """A random colour as saturated and bright as the palette's, of any hue but those the evaluator would name as
    a colour held out with this shape (its nearest palette hue), so no held-out pair is ever drawn."""
    from ..evaluate import PALETTE_NAMES, nearest_hue

    banned = {color for color, held in HELDOUT_PAIRS if held == shape}
    while True:
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.75, 0.9), rng.uniform(0.7, 0.93))
        fill = tuple(round(255 * c) for c in rgb)
        if PALETTE_NAMES[int(nearest_hue(np.array(fill))) - 1] not in banned:
            return fill


class CodecDataset(ShapesDataset):
    """The autoencoder's data (stage 1): the training scenes, every odd one with its objects recoloured by
    `codec_color`. An image codec should reproduce any colour on any edge; trained on the palette alone, it
    learns which colours go with which shapes and spoils held-out pairs at their rims (docs/builtin.md)."""

    def __init__(self, length: int, seed: int = 0, size: int = 64):
        super().__init__(length, seed, "train", size)

    def __getitem__(self, index: int) -> dict:
        if index % 2 == 0 or not 0 <= index < self.length:
            return super().__getitem__(index)
        scene, _ = scene_caption(self.seed, self.split, index)
        rng = random.Random(f"codec:{self.seed}:{index}")
        fills = [codec_color(rng, obj.shape) for obj in scene.objects]
        return {"image": to_tensor(render(scene, self.size, fills))[0], "caption": ""}


def sample_prompts(n: int, seed: int = 0, split: str = "heldout") -> list[tuple[Prompt, str]]:
    """n (structured prompt, caption) pairs of the split, cycling through its kinds evenly."""
    rng = random.Random(f"prompts:{seed}:{split}")
    kinds = HELDOUT_KINDS if split == "heldout" else KINDS
    scenes = [sample_scene(rng, split, kinds[i % len(kinds)]) for i in range(n)]
    return [(scene.prompt, caption(scene.prompt, rng)) for scene in scenes]


def heldout_prompts(n: int, seed: int = 0) -> list[tuple[Prompt, str]]:
    """n held-out compositions (never in training), as (structured prompt, caption)."""
    return sample_prompts(n, seed, "heldout")


def write_dataset(folder: str | Path, n: int, seed: int = 0, split: str = "train", size: int = 64) -> Path:
    """Write the first n examples of ShapesDataset(n, seed, split, size) as PNG + .txt + metadata.jsonl."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index in range(n):
            scene, text, image = example(seed, split, index, size)
            name = f"{index:06d}.png"
            image.save(folder / name)
            (folder / name).with_suffix(".txt").write_text(text + "\n")
            metadata.write(json.dumps({"file_name": name, "text": text, "prompt": asdict(scene.prompt)}) + "\n")
    return folder

