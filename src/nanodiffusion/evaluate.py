"""The compositional evaluator for the built-in model, after GenEval (Ghosh et al. 2023).

GenEval scores a text-to-image model by detecting the objects in each generated image and checking
them against the prompt, per category: single object, two objects, counting, colours, position,
colour attribution. Our world is the synthetic shapes scenes, so the detector is plain geometry:
  1. colour segmentation: a pixel is background unless its chroma (max - min channel) is high;
     then it takes the palette colour of nearest hue (robust to blur, shading and washed-out colours);
  2. 4-connected components of each colour, dropping specks below MIN_AREA;
  3. shape: each template (circle, square, triangle, star) is fitted to the object's soft coverage map
     (same area, centroid and aspect), blurred by a few amounts, and the best soft IoU wins; blur keeps
     area and centroid, so the fit holds for the blurry objects a small diffusion model draws.
An image is correct when its objects match the prompt's exactly (the same number of objects, each
with the named shape and, where named, colour) and, for position, the relation holds between them.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from .data.captions import KINDS, SHAPES, Prompt, parse_caption
from .data.folder import image_captions
from .data.shapes import HELDOUT_PAIRS, PALETTE, SUPERSAMPLE, Scene, draw_shape, relation_holds
from .errors import NanoDiffusionError
from .prompts import parse_parameters

ANALYSIS_SIZE = 64
MIN_CHROMA = 70  # of 255: background and its noise sit far below, half-covered edge pixels above
MIN_AREA = 0.004  # of the image: ~16 pixels at 64 x 64
BLURS = (0.0, 0.7, 1.4, 2.1)  # pixels: the blur levels shape templates are tried at
PAD = 4  # pixels of context around an object's box
CATEGORY_NAMES = {"single": "single object", "two": "two objects", "counting": "counting",
                  "colors": "colors", "position": "position", "color_attr": "color attribution"}


@dataclass(frozen=True)
class Detection:
    """One detected object: box centre (cx, cy) and area as fractions of the image, template IoU."""

    shape: str
    color: str
    cx: float
    cy: float
    area: float
    iou: float

    def __str__(self) -> str:
        return f"{self.color} {self.shape}"


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in degrees [0, 360) of RGB values (the HSV hexcone)."""
    r, g, b = np.moveaxis(rgb.astype(np.float32), -1, 0)
    high, low = rgb.max(-1).astype(np.float32), rgb.min(-1).astype(np.float32)
    spread = np.maximum(high - low, 1e-6)
    sector = np.where(high == r, (g - b) / spread, np.where(high == g, 2 + (b - r) / spread, 4 + (r - g) / spread))
    return (60 * sector) % 360


PALETTE_NAMES = tuple(PALETTE)
PALETTE_HUES = hue(np.array([PALETTE[name] for name in PALETTE_NAMES]))


def nearest_hue(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: 1 + index of the palette colour of nearest hue."""
    distance = np.abs(hue(rgb)[..., None] - PALETTE_HUES)
    return np.minimum(distance, 360 - distance).argmin(-1) + 1


def chroma(rgb: np.ndarray) -> np.ndarray:
    """Colourfulness max - min channel, 0 for grays (the background)."""
    return rgb.max(-1).astype(np.float32) - rgb.min(-1)


def _soft_map(rgb: np.ndarray, hues: np.ndarray, labels: np.ndarray, mask: np.ndarray, label: int) -> np.ndarray:
    """Coverage in [0, 1] of one object over its box grown by PAD: chroma of its hue, scaled from the
    background's level (0) to the object's core level (1), with other objects' pixels removed."""
    ys, xs = np.nonzero(mask)
    window = (slice(max(ys.min() - PAD, 0), ys.max() + 1 + PAD), slice(max(xs.min() - PAD, 0), xs.max() + 1 + PAD))
    level = chroma(rgb[window])
    floor = np.median(level[labels[window] == 0]) if (labels[window] == 0).any() else 0.0
    core = np.percentile(level[mask[window]], 90)
    soft = np.clip((level - floor) / max(core - floor, 1.0), 0, 1)
    return np.where((hues[window] == label) & ((labels[window] == 0) | mask[window]), soft, 0)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """Component id per pixel (-1 for label 0): 4-connected regions of equal label, found by min-label
    propagation with pointer jumping (each id is the smallest flat index in its component)."""
    height, width = labels.shape
    none = height * width
    ids = np.where(labels > 0, np.arange(none).reshape(height, width), none)
    right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)
    down = (labels[1:] == labels[:-1]) & (labels[1:] > 0)
    while True:
        new = ids.copy()
        new[:, :-1] = np.minimum(new[:, :-1], np.where(right, ids[:, 1:], none))
        new[:, 1:] = np.minimum(new[:, 1:], np.where(right, ids[:, :-1], none))
        new[:-1] = np.minimum(new[:-1], np.where(down, ids[1:], none))
        new[1:] = np.minimum(new[1:], np.where(down, ids[:-1], none))
        flat = new.reshape(-1)
        inside = flat < none
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, ids):
            return np.where(ids < none, ids, -1)
        ids = new


def _coverage(shape: str, box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """Fraction of each pixel of a height x width window that the shape in box (x0, y0, x1, y1) covers."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * SUPERSAMPLE for v in box), 255)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255


@lru_cache(maxsize=None)
def _fill_and_centroid(shape: str) -> tuple[float, float, float]:
    """Fraction of its box a shape covers, and its centroid's offset from the box centre (in half sides)."""
    cover = _coverage(shape, (0, 0, 256, 256), 256, 256)
    ys, xs = np.indices(cover.shape) + 0.5
    mass = cover.sum()
    return mass / cover.size, (xs * cover).sum() / mass / 128 - 1, (ys * cover).sum() / mass / 128 - 1


@lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n matrix of a 1-D Gaussian blur with standard deviation sigma pixels."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum(1, keepdims=True)


def classify_shape(soft: np.ndarray, aspect: float) -> tuple[str, float]:
    """The shape whose template best explains a soft coverage map: each template gets the map's mass
    (area), centroid and box aspect, is blurred by each of BLURS, and is scored by soft IoU
    sum(min) / sum(max); blur preserves mass and centroid, so blurry objects still fit. -> (shape, IoU)."""
    height, width = soft.shape
    mass = soft.sum()
    cy, cx = (np.indices(soft.shape) + 0.5).reshape(2, -1) @ soft.reshape(-1) / mass
    best = ("", -1.0)
    for shape in SHAPES:
        fill, ox, oy = _fill_and_centroid(shape)
        box_width = float(np.sqrt(mass / fill * aspect))
        box_height = float(mass / fill / box_width)
        x0, y0 = cx - (1 + ox) * box_width / 2, cy - (1 + oy) * box_height / 2
        template = _coverage(shape, (x0, y0, x0 + box_width, y0 + box_height), height, width)
        for sigma in BLURS:
            blurred = template if sigma == 0 else _blur_matrix(height, sigma) @ template @ _blur_matrix(width, sigma).T
            iou = float(np.minimum(blurred, soft).sum() / np.maximum(blurred, soft).sum())
            best = max(best, (shape, iou), key=lambda pair: pair[1])
    return best


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """The coloured objects of an image (analysed at 64 x 64), largest first."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
    rgb = np.asarray(image)
    hues = nearest_hue(rgb)
    labels = np.where(chroma(rgb) >= MIN_CHROMA, hues, 0)
    components = connected_components(labels)
    ids, counts = np.unique(components[components >= 0], return_counts=True)
    detections = []
    for component, count in zip(ids, counts):
        if count < MIN_AREA * components.size:
            continue
        mask = components == component
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        label = labels.flat[component]
        shape, iou = classify_shape(_soft_map(rgb, hues, labels, mask, label), (x1 - x0) / (y1 - y0))
        color = PALETTE_NAMES[label - 1]
        detections.append(Detection(shape, color, (x0 + x1) / 2 / ANALYSIS_SIZE, (y0 + y1) / 2 / ANALYSIS_SIZE,
                                    count / components.size, iou))
    return sorted(detections, key=lambda d: -d.area)


def _as_prompt(prompt: Prompt | Scene | str) -> Prompt:
    if isinstance(prompt, Scene):
        return prompt.prompt
    return parse_caption(prompt) if isinstance(prompt, str) else prompt


def _describe(objects: Iterable) -> str:
    names = [f"{color} {shape}" if color else shape for shape, color in objects]
    return ", ".join(names) or "nothing"


def score(image: Image.Image | np.ndarray, prompt: Prompt | Scene | str) -> dict:
    """Whether the image shows exactly what the prompt says: dict(correct, category, reason)."""
    prompt = _as_prompt(prompt)
    detections = detect(image)
    expected, found = _describe(prompt.objects), _describe((d.shape, d.color) for d in detections)
    result = {"correct": False, "category": prompt.kind}
    if len(detections) != len(prompt.objects):
        return {**result, "reason": f"expected {len(prompt.objects)} object(s) ({expected}), found "
                                    f"{len(detections)} ({found})"}
    matched = False
    for order in itertools.permutations(detections):
        if all(d.shape == shape and color in (None, d.color) for d, (shape, color) in zip(order, prompt.objects)):
            matched = True
            if prompt.relation is None or relation_holds(
                    prompt.relation, (order[0].cx, order[0].cy), (order[1].cx, order[1].cy)):
                return {**result, "correct": True, "reason": f"found {found}"}
    if matched:
        return {**result, "reason": f"found {found}, but the {_describe(prompt.objects[:1])} is not "
                                    f"{prompt.relation} the {_describe(prompt.objects[1:2])}"}
    return {**result, "reason": f"expected {expected}, found {found}"}


def tally(marks: list[bool]) -> dict:
    """Correct, total and accuracy of a list of marks."""
    return {"correct": sum(marks), "total": len(marks), "accuracy": sum(marks) / len(marks)}


def heldout_pairs(prompt: Prompt) -> list[str]:
    """The held-out colour-shape pairs (data/shapes.py HELDOUT_PAIRS) a prompt names, as "green square"."""
    return sorted({f"{color} {shape}" for shape, color in prompt.objects if (color, shape) in HELDOUT_PAIRS})


def evaluate(images: Iterable[Image.Image], prompts: Iterable[Prompt | Scene | str]) -> dict:
    """Per-category accuracy and overall (the mean over categories, as GenEval reports it); and per held-out
    colour-shape pair, the accuracy of the images whose prompt names it (a model that generalises to some unseen
    pairs and not to others shows it here)."""
    prompts = [_as_prompt(prompt) for prompt in prompts]
    items = [score(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    categories = {kind: tally([item["correct"] for item in items if item["category"] == kind]) for kind in KINDS
                  if any(item["category"] == kind for item in items)}
    named = [(pair, item["correct"]) for prompt, item in zip(prompts, items) for pair in heldout_pairs(prompt)]
    pairs = {pair: tally([mark for p, mark in named if p == pair]) for pair in sorted({p for p, _ in named})}
    overall = sum(c["accuracy"] for c in categories.values()) / len(categories) if categories else 0.0
    return {"categories": categories, "overall": overall, "pairs": pairs, "items": items}


def folder_prompt(path: Path, text: str) -> str:
    """The caption file's text, else the prompt in the PNG "parameters" chunk."""
    if text:
        return text
    with Image.open(path) as image:
        return parse_parameters(image.info.get("parameters", ""))[0]


def evaluate_folder(path: str | Path) -> dict:
    """Evaluate a folder of images whose prompts are in captions (.txt / metadata.jsonl) or PNG text."""
    images, prompts, files, skipped = [], [], [], []
    for file, text in image_captions(path):
        try:
            prompt = parse_caption(folder_prompt(file, text))
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (NanoDiffusionError, OSError, SyntaxError):
            skipped.append(file.name)
            continue
        prompts.append(prompt)
        files.append(file.name)
    if skipped:
        warnings.warn(f"skipping {len(skipped)} image(s) in {path} without a readable shapes prompt: "
                      f"{', '.join(skipped)}", stacklevel=2)
    if not images:
        raise NanoDiffusionError(f"no image in {path} has a shapes prompt (caption .txt, metadata.jsonl or PNG "
                                 "parameters) the evaluator can read, e.g. 'a red circle above a blue square'")
    results = evaluate(images, prompts)
    for item, file in zip(results["items"], files):
        item["file"] = file
    return results


def format_table(results: dict) -> str:
    """Markdown table of per-category accuracy and the overall score (and, where prompts name held-out pairs,
    a table of them)."""
    def line(name: str, row: dict) -> str:
        return f"| {name} | {row['correct']} | {row['total']} | {row['accuracy']:.1%} |"

    lines = ["| category | correct | total | accuracy |", "|---|---:|---:|---:|"]
    lines += [line(CATEGORY_NAMES[kind], row) for kind, row in results["categories"].items()]
    lines.append(f"| **overall** | | {sum(r['total'] for r in results['categories'].values())} | "
                 f"**{results['overall']:.1%}** |")
    if results.get("pairs"):
        lines += ["", "| held-out pair named | correct | total | accuracy |", "|---|---:|---:|---:|"]
        lines += [line(pair, row) for pair, row in results["pairs"].items()]
    return "\n".join(lines)
