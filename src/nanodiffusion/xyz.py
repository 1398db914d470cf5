"""X/Y/Z plot: one image per combination of two or three generation parameters, drawn as one labelled grid.

Like the popular web UI's script: X varies along the columns, Y along the rows, and each Z value makes its
own grid (side by side or stacked) with a title. An axis is a keyword of `pipe(...)` (steps, cfg, sampler,
schedule, seed, strength, ...), `prompt_sr`, the web UI's "Prompt S/R": its first value is searched for in
the prompt and negative prompt and every value in turn replaces it, or `prompt_order` ("Prompt order": its
values' places in the prompt filled in every order). Axis values can be written the web UI's way: "1-5"
(inclusive range), "1-5 (+2)" (with a step), "1-10 [5]" (five values spread evenly), "a, b, c".
"""

from __future__ import annotations

import csv
import itertools
import math
import random
import re
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from .errors import NanoDiffusionError
from .prompts import quote

PROMPT_SR = "prompt_sr"
PROMPT_ORDER = "prompt_order"
KINDS: dict[str, type] = {"steps": int, "seed": int, "width": int, "height": int, "clip_skip": int, "cfg": float,
                          "strength": float, "eta": float, "control_scale": float, "sampler": str,
                          "schedule": str, "prompt": str, "negative_prompt": str, PROMPT_SR: str, PROMPT_ORDER: tuple}
LABELS = {"steps": "Steps", "seed": "Seed", "width": "Width", "height": "Height", "clip_skip": "Clip skip",
          "cfg": "CFG scale", "strength": "Denoising", "eta": "Eta", "control_scale": "Control scale",
          "sampler": "Sampler", "schedule": "Schedule type", "prompt": "Prompt", "negative_prompt": "Negative prompt",
          PROMPT_SR: "Prompt S/R", PROMPT_ORDER: "Prompt order"}
BARE_LABELS = {"sampler", "schedule", "prompt", "negative_prompt", PROMPT_SR, PROMPT_ORDER,   # cells labelled by
               "Sampler", "Prompt S/R", "Prompt order", "Checkpoint name"}   # the value alone (ours, web UI's)
MAX_VALUES = 1000
NUMBER = r"[+-]?\s*\d+(?:\.\d*)?"
STEPPED = re.compile(rf"\s*({NUMBER})\s*-\s*({NUMBER})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\))?\s*")
COUNTED = re.compile(rf"\s*({NUMBER})\s*-\s*({NUMBER})\s*\[\s*(\d+)\s*\]\s*")

Axis = tuple[str, list]
Callback = Callable[[int, int, Any], None]


def split_values(text: str) -> list[str]:
    """Comma-separated values, CSV-quoted where a value holds a comma, each stripped; empty ones dropped."""
    values = [value.strip() for row in csv.reader(text.splitlines(), skipinitialspace=True) for value in row]
    return [value for value in values if value]


def number(text: str, kind: type) -> int | float:
    """One number of an axis, with a clear error for text that is not one."""
    try:
        return kind(text.replace(" ", ""))
    except ValueError:
        raise NanoDiffusionError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def expand(value: str, kind: type) -> list[int | float]:
    """One number or range item: "7", "1-5", "1-5 (+2)", "10-1 (-3)" (ends included) or "1-10 [5]"."""
    if match := COUNTED.fullmatch(value):
        start, end, count = number(match[1], float), number(match[2], float), int(match[3])
        check_count(count, value)
        spread = [start + (end - start) * i / max(count - 1, 1) for i in range(count)]
        return [int(v) if kind is int else round(v, 10) for v in spread]
    if match := STEPPED.fullmatch(value):
        start, end = number(match[1], kind), number(match[2], kind)
        step = number(match[3], kind) if match[3] else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise NanoDiffusionError(f"the range {value!r} never reaches its end: give a step with the right sign")
        count = math.floor((end - start) / step + 1e-9) + 1
        check_count(count, value)
        return [kind(round(start + i * step, 10)) for i in range(count)]
    return [number(value, kind)]


def check_count(count: int, value: str) -> None:
    """An axis may hold 1 to MAX_VALUES values."""
    if not 1 <= count <= MAX_VALUES:
        raise NanoDiffusionError(f"the range {value!r} gives {count} values: use 1 to {MAX_VALUES}")


def parse_axis(name: str, text: str) -> list:
    """An axis's values from the web UI's syntax, typed for the keyword `name` (numbers expand ranges)."""
    if name not in KINDS:
        raise NanoDiffusionError(f"unknown X/Y/Z axis {name!r}; choose one of: {', '.join(KINDS)}")
    return typed_values(LABELS[name], KINDS[name], split_values(text))


def typed_values(label: str, kind: type, items: list[str]) -> list:
    """An axis's items as values of `kind`: numbers expand their ranges, a tuple axis (Prompt order) takes every
    order of its items; 1 to MAX_VALUES values."""
    if kind is tuple:
        if math.factorial(len(items)) > MAX_VALUES:
            raise NanoDiffusionError(f"the {label} axis has {len(items)} values, {math.factorial(len(items))} "
                                     f"orders: use at most {MAX_VALUES} orders (6 values)")
        values = list(itertools.permutations(items)) if items else []
    else:
        values = items if kind is str else [v for item in items for v in expand(item, kind)]
    if not values:
        raise NanoDiffusionError(f"the {label} axis has no values: write them like 1-5 or a, b, c")
    if len(values) > MAX_VALUES:
        raise NanoDiffusionError(f"the {label} axis has {len(values)} values: use at most {MAX_VALUES}")
    return values


def apply(kwargs: dict[str, Any], name: str, value: Any, values: list) -> dict[str, Any]:
    """One axis value set on a copy of the keyword arguments; Prompt S/R replaces its first value by this one,
    Prompt order puts the prompt's words `value` (a tuple) in that order."""
    if name == PROMPT_ORDER:
        return {**kwargs, "prompt": reorder(kwargs.get("prompt", ""), value)}
    if name != PROMPT_SR:
        return {**kwargs, name: value}
    search = values[0]
    prompt, negative = kwargs.get("prompt", ""), kwargs.get("negative_prompt", "")
    if search not in prompt and search not in negative:
        raise NanoDiffusionError(f"Prompt S/R did not find {search!r} in the prompt or the negative prompt")
    return {**kwargs, "prompt": prompt.replace(search, value), "negative_prompt": negative.replace(search, value)}


def reorder(prompt: str, tokens: tuple[str, ...]) -> str:
    """The web UI's "Prompt order": the tokens' places in the prompt, earliest first, filled with `tokens` in order."""
    missing = [token for token in tokens if token not in prompt]
    if missing:
        raise NanoDiffusionError(f"Prompt order did not find {missing[0]!r} in the prompt")
    parts, rest = [], prompt
    for _, token in sorted((prompt.find(token), token) for token in tokens):
        index = rest.find(token)
        parts.append(rest[:index])
        rest = rest[index + len(token):]
    return "".join(part + token for part, token in zip(parts, tokens)) + rest


def xyz_cells(base: dict[str, Any], axes: list[Axis]) -> list[dict[str, Any]]:
    """The keyword arguments of every cell, X fastest, then Y, then Z; a base seed of -1 is drawn once for all."""
    if not 1 <= len(axes) <= 3 or any(not values for _, values in axes):
        raise NanoDiffusionError("an X/Y/Z plot needs one to three axes, each with at least one value")
    base = {**base, "seed": fixed_seed(base.get("seed"))}
    cells = []
    for combination in itertools.product(*(values for _, values in reversed(axes))):
        kwargs = base
        for (name, values), value in zip(axes, reversed(combination)):
            kwargs = apply(kwargs, name, value, values)
        cells.append(kwargs)
    return cells


def fixed_seed(seed: int | None) -> int:
    """A seed of -1 (or none) drawn once, so every cell that shares it gets the same noise."""
    return random.randrange(2**32) if seed is None or seed < 0 else seed


def fix_axis_seeds(axes: list[Axis]) -> list[Axis]:
    """Seed axis values of -1 drawn once, so the grid's labels show the seeds its cells used."""
    return [(name, [fixed_seed(v) for v in values] if name == "seed" else values) for name, values in axes]


def run_cells(pipe: Callable[..., list[Image.Image]], cells: list[dict[str, Any]],
              callback: Callback | None = None, *,
              stop: tuple[type[BaseException], ...] = ()) -> list[Image.Image | None]:
    """The first image of each cell; the callback sees the steps of all cells as one count (step, total, x0).
    An exception in `stop` (an interrupt) ends the plot early: the stopped cell and those after it are None (drawn
    black, like the web UI's empty cells); raised again when no cell has finished."""
    weights = [max(1, int(cell.get("steps", 1))) for cell in cells]
    total, images = sum(weights), []
    for index, cell in enumerate(cells):
        try:
            images.append(run_cell(pipe, cell, callback, sum(weights[:index]), weights[index], total))
        except stop:
            if not images:
                raise
            images += [None] * (len(cells) - len(images))
            break
    return images


def run_cell(pipe: Callable[..., list[Image.Image]], cell: dict[str, Any], callback: Callback | None, done: int,
             weight: int, total: int) -> Image.Image:
    """One cell's first image, its steps counted from `done` of `total` for the callback."""

    def on_step(step: int, steps: int, x0: Any) -> None:
        callback(done + round(step * weight / max(steps, 1)), total, x0)

    prompt, negative = cell.get("prompt", ""), cell.get("negative_prompt", "")
    rest = {k: v for k, v in cell.items() if k not in ("prompt", "negative_prompt")}
    return pipe(prompt, negative, **{**rest, "batch": 1}, **({"callback": on_step} if callback else {}))[0]


def value_label(name: str, value: Any) -> str:
    """A cell's label: "Steps: 20", or the bare value for names and prompts (a word order: its words)."""
    shown = f"{value:g}" if isinstance(value, float) else ", ".join(value) if isinstance(value, tuple) else str(value)
    return shown if name in BARE_LABELS else f"{LABELS.get(name, name)}: {shown}"


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at a size (no font file needed)."""
    return ImageFont.load_default(size)


def wrap(draw: ImageDraw.ImageDraw, text: str, face: Any, width: int) -> str:
    """Break a label into lines no wider than `width` pixels (words longer than a line stay whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=face) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def labelled_grid(images: list[Image.Image], columns: list[str], rows: list[str], title: str = "",
                  margin: int = 0) -> Image.Image:
    """Cells in len(rows) x len(columns), column labels above, row labels on the left, an optional title on top,
    `margin` pixels between cells."""
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    step_w, step_h = cell_w + margin, cell_h + margin
    face = font(max(12, min(cell_w, cell_h) // 8))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 0 if not any(rows) else min(max(cell_w, 96), max(int(measure.textlength(r, font=face)) for r in rows) + 16)
    head = [wrap(measure, text, face, cell_w - 8) for text in columns]
    line = face.size + 4 if hasattr(face, "size") else 16
    top = 0 if not any(columns) else line * max(h.count("\n") + 1 for h in head) + 8
    title_h = line + 8 if title else 0
    grid = Image.new("RGB", (left + step_w * len(columns) - margin, title_h + top + step_h * len(rows) - margin),
                     "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((left + (step_w * len(columns) - margin) // 2, title_h // 2), title, fill="black", font=face,
                  anchor="mm")
    for x, text in enumerate(head):
        draw.multiline_text((left + step_w * x + cell_w // 2, title_h + top // 2), text, fill="black", font=face,
                            anchor="mm", align="center")
    for y, text in enumerate(rows):
        draw.multiline_text((left // 2, title_h + top + step_h * y + cell_h // 2),
                            wrap(measure, text, face, max(left - 8, 8)), fill="black", font=face, anchor="mm",
                            align="center")
    for index, image in enumerate(images):
        x, y = index % len(columns), index // len(columns)
        grid.paste(image, (left + step_w * x + (cell_w - image.width) // 2,
                           title_h + top + step_h * y + (cell_h - image.height) // 2))
    return grid


def xyz_grids(images: list[Image.Image | None], axes: list[Axis], *, legend: bool = True,
              margin: int = 0) -> list[Image.Image]:
    """Cell images (X fastest) -> one labelled grid per Z value (titled with it); a missing cell (None: never run)
    is black. Without legend: no labels, titles or margins, as the web UI draws it."""
    first = next(image for image in images if image is not None)
    images = [Image.new(first.mode, first.size) if image is None else image for image in images]
    names = [name for name, _ in axes] + [""] * (3 - len(axes))
    values = [values for _, values in axes] + [[""]] * (3 - len(axes))
    labels = [[value_label(n, v) if n and legend else "" for v in vs] for n, vs in zip(names, values)]
    per_grid = len(values[0]) * len(values[1])
    return [labelled_grid(images[z * per_grid:(z + 1) * per_grid], labels[0], labels[1], labels[2][z],
                          margin if legend else 0) for z in range(len(values[2]))]


def draw_xyz_grid(images: list[Image.Image | None], axes: list[Axis], *, stack: bool = False, legend: bool = True,
                  margin: int = 0) -> Image.Image:
    """Cell images (X fastest) -> one labelled PNG; Z grids side by side, or one above the other with stack."""
    return join_grids(xyz_grids(images, axes, legend=legend, margin=margin), stack=stack)


def join_grids(grids: list[Image.Image], *, stack: bool = False) -> Image.Image:
    """Z grids side by side (16 pixels apart), or one above the other with stack."""
    width = max(g.width for g in grids) if stack else sum(g.width for g in grids) + 16 * (len(grids) - 1)
    height = sum(g.height for g in grids) + 16 * (len(grids) - 1) if stack else max(g.height for g in grids)
    sheet = Image.new("RGB", (width, height), "white")
    offset = 0
    for grid in grids:
        sheet.paste(grid, (0, offset) if stack else (offset, 0))
        offset += (grid.height if stack else grid.width) + 16
    return sheet


def plot_parameters(first: Image.Image, axes: list[Axis]) -> str:
    """The first cell's parameters text with the axes added, like the web UI's "X Type: ..., X Values: ..."."""
    extra = ["Script: X/Y/Z plot"]
    for letter, (name, values) in zip("XYZ", axes):
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        extra.append(f"{letter} Type: {quote(LABELS.get(name, name))}, {letter} Values: {quote(shown)}")
    text = first.info.get("parameters", "")
    return f"{text}, {', '.join(extra)}" if text else ", ".join(extra)


def plot_cells(pipe: Callable[..., list[Image.Image]], cells: list[dict[str, Any]], axes: list[Axis], *,
               callback: Callback | None = None, stack: bool = False) -> Image.Image:
    """Run prepared cells (from xyz_cells, possibly checked further) and draw their grid."""
    images = run_cells(pipe, cells, callback)
    grid = draw_xyz_grid(images, axes, stack=stack)
    grid.info["parameters"] = plot_parameters(images[0], axes)
    return grid


def xyz_plot(pipe: Callable[..., list[Image.Image]], base: dict[str, Any], axes: list[Axis], *,
             callback: Callback | None = None, stack: bool = False) -> Image.Image:
    """A grid over one to three parameters: base holds pipe(...)'s keywords (prompt included), axes (name, values)."""
    axes = fix_axis_seeds(axes)
    return plot_cells(pipe, xyz_cells(base, axes), axes, callback=callback, stack=stack)
