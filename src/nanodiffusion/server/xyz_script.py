"""The web UI's "X/Y/Z plot" script through /sdapi/v1/txt2img and img2img (`"script_name": "x/y/z plot"`).

`script_args` are the positional arguments of the web UI's scripts/xyz_grid.py `Script.run` (v1.10), after `p`:
x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, z_values_dropdown,
draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z,
margin_size, csv_mode; missing ones take the web UI's defaults. A type is an index into the web UI's axis list as
that mode offers it (WEB_AXES; its label works too). The axes this project has are honoured (HONOURED), any other
is a 422 naming it. Every cell is checked as its own request (limits, names, images), then the plot runs as one job
whose images are the grid (with the first cell's parameters text and the script's "X Type: ..., X Values: ..."),
the Z sub-grids with include_sub_grids, then the cells with include_lone_images, as the web UI answers.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Any

from PIL import Image
from pydantic import ValidationError

from ..errors import NanoDiffusionError
from ..pipeline import Interrupted
from ..prompts import quote
from ..xyz import (PROMPT_ORDER, PROMPT_SR, apply, fixed_seed, join_grids, run_cells, split_values, typed_values,
                   xyz_grids)
from .jobs import build_job
from .queue import Job
from .schema import Img2ImgRequest, Limits, Txt2ImgRequest

SCRIPT_NAME = "x/y/z plot"   # the web UI's script title "X/Y/Z plot", lower-cased as /sdapi/v1/scripts lists it
MAX_PLOT_CELLS = 64

# scripts/xyz_grid.py axis_options in order; a mode: offered in that mode only (AxisOptionTxt2Img / Img2Img)
WEB_AXES: list[tuple[str, str | None]] = [
    ("Nothing", None), ("Seed", None), ("Var. seed", None), ("Var. strength", None), ("Steps", None),
    ("Hires steps", "txt2img"), ("CFG Scale", None), ("Image CFG Scale", "img2img"), ("Prompt S/R", None),
    ("Prompt order", None), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
    ("Checkpoint name", None), ("Negative Guidance minimum sigma", None), ("Sigma Churn", None), ("Sigma min", None),
    ("Sigma max", None), ("Sigma noise", None), ("Schedule type", None), ("Schedule min sigma", None),
    ("Schedule max sigma", None), ("Schedule rho", None), ("Beta schedule alpha", None), ("Beta schedule beta", None),
    ("Eta", None), ("Clip skip", None), ("Denoising", None), ("Initial noise multiplier", None), ("Extra noise", None),
    ("Hires upscaler", "txt2img"), ("Cond. Image Mask Weight", "img2img"), ("VAE", None), ("Styles", None),
    ("UniPC Order", None), ("Face restore", None), ("Token merging ratio", None),
    ("Token merging ratio high-res", None), ("Always discard next-to-last sigma", None),
    ("SGM noise multiplier", None), ("Refiner checkpoint", None), ("Refiner switch at", None), ("RNG source", None),
    ("FP8 mode", None), ("Size", None),
]
CLIP_SKIP, STYLES, SIZE = "clip_skip", "styles", "size"   # axes that set something other than one request field
HONOURED: dict[str, tuple[str, type]] = {   # web UI axis -> the request field it sets, its values' type
    "Seed": ("seed", int), "Var. seed": ("subseed", int), "Var. strength": ("subseed_strength", float),
    "Steps": ("steps", int), "Hires steps": ("hr_second_pass_steps", int), "CFG Scale": ("cfg_scale", float),
    "Prompt S/R": (PROMPT_SR, str), "Prompt order": (PROMPT_ORDER, tuple), "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str), "Eta": ("eta", float), "Clip skip": (CLIP_SKIP, int),
    "Denoising": ("denoising_strength", float), "Hires upscaler": ("hr_upscaler", str), "Styles": (STYLES, str),
    "Size": (SIZE, str),
}
DROPDOWNS = {"Sampler", "Hires sampler", "Checkpoint name", "Schedule type", "Hires upscaler", "VAE", "Styles",
             "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "RNG source",
             "FP8 mode"}   # axes whose values come from *_values_dropdown unless csv_mode (the web UI's `choices`)
SEED_AXES = {"Seed", "Var. seed"}
ARGS = ["x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type", "z_values",
        "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds",
        "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode"]
DEFAULTS = [1, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
LABELS = ["X type", "X values", "X values", "Y type", "Y values", "Y values", "Z type", "Z values", "Z values",
          "Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
          "Vary seeds for Y", "Vary seeds for Z", "Grid margins (px)", "Use text inputs instead of dropdowns"]


def is_xyz_plot(request: Txt2ImgRequest) -> bool:
    """Whether the request asks for the X/Y/Z plot script (its name in any case)."""
    name = getattr(request, "script_name", None)   # script_name / script_args: fields the body may leave out
    return isinstance(name, str) and name.strip().lower() == SCRIPT_NAME


def axis_labels(img2img: bool) -> list[str]:
    """The axis labels an x/y/z_type indexes, in the web UI's order for the mode."""
    mode = "img2img" if img2img else "txt2img"
    return [label for label, only in WEB_AXES if only in (None, mode)]


def script_info(img2img: bool) -> dict[str, Any]:
    """/sdapi/v1/script-info's entry for the script: its arguments as the web UI's UI components describe them."""
    labels = axis_labels(img2img)
    args = []
    for name, label, default in zip(ARGS, LABELS, DEFAULTS):
        arg = {"label": label, "value": default, "minimum": None, "maximum": None, "step": None, "choices": None}
        if name.endswith("_type"):
            arg.update(value=labels[default], choices=labels)
        elif name == "margin_size":
            arg.update(minimum=0, maximum=500, step=2)
        args.append(arg)
    return {"name": SCRIPT_NAME, "is_alwayson": False, "is_img2img": img2img, "args": args}


def flag(value: Any, name: str) -> bool:
    """A checkbox argument: a boolean, 0 / 1, or "true" / "false" (clients send all three)."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", ""):
            raise NanoDiffusionError(f"X/Y/Z plot {name} {value!r} is not a boolean: send true or false")
        return value.strip().lower() in ("true", "1")
    return bool(value)


def script_args(request: Txt2ImgRequest) -> dict[str, Any]:
    """script_args -> the run arguments by name, the web UI's defaults filling what is missing."""
    given = getattr(request, "script_args", None)
    given = [] if given is None else given
    if not isinstance(given, list) or len(given) > len(ARGS):
        raise NanoDiffusionError(f"script_args for the X/Y/Z plot must be a list of at most {len(ARGS)} values: "
                                 f"{', '.join(ARGS)}")
    args = dict(zip(ARGS, [*given, *DEFAULTS[len(given):]]))
    for name in ARGS[9:16] + ARGS[17:]:
        args[name] = flag(args[name], name)
    margin = args["margin_size"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 500:
        raise NanoDiffusionError(f"X/Y/Z plot margin_size {margin!r} is not allowed: use 0 to 500 pixels")
    args["margin_size"] = int(margin)
    return args


def axis_label(kind: Any, letter: str, img2img: bool) -> str:
    """An x/y/z_type (an index, None for Nothing, or a label) -> the axis label; 422 for one out of range."""
    labels = axis_labels(img2img)
    if kind is None:
        return "Nothing"
    if isinstance(kind, str) and not kind.strip().lstrip("-").isdigit():
        found = [label for label in labels if label.lower() == kind.strip().lower()]
        if not found:
            raise NanoDiffusionError(f"X/Y/Z plot {letter.lower()}_type {kind!r} is not an axis of "
                                     f"{'img2img' if img2img else 'txt2img'}: use an index 0 to {len(labels) - 1} "
                                     "or a label listed by /sdapi/v1/script-info")
        return found[0]
    if isinstance(kind, bool) or not isinstance(kind, (int, str)) or not 0 <= int(kind) < len(labels):
        raise NanoDiffusionError(f"X/Y/Z plot {letter.lower()}_type {kind!r} is out of range: use 0 to "
                                 f"{len(labels) - 1} (the web UI's axis list, see /sdapi/v1/script-info)")
    return labels[int(kind)]


def axis_values(label: str, text: Any, dropdown: Any, csv_mode: bool, letter: str) -> tuple[list, str]:
    """An axis's values, parsed as the web UI does (ranges for numbers, every order for Prompt order), and the
    text its infotext shows."""
    if label not in HONOURED:
        raise NanoDiffusionError(f"the X/Y/Z plot's {letter} axis {label!r} is not available on this server: use "
                                 f"one of {', '.join(HONOURED)}")
    if label in DROPDOWNS and not csv_mode and dropdown:
        if not isinstance(dropdown, list) or not all(isinstance(v, str) for v in dropdown):
            raise NanoDiffusionError(f"X/Y/Z plot {letter.lower()}_values_dropdown must be a list of names")
        items, text = [v.strip() for v in dropdown if v.strip()], ", ".join(dropdown)
    else:
        if not isinstance(text, str):
            raise NanoDiffusionError(f"X/Y/Z plot {letter.lower()}_values must be text such as \"1-5\" or \"a, b\"")
        items = split_values(text)
    try:
        return typed_values(f"{letter} ({label})", HONOURED[label][1], items), text
    except NanoDiffusionError as error:
        raise NanoDiffusionError(f"the X/Y/Z plot's {error}") from None


def set_value(cell: dict[str, Any], label: str, value: Any, values: list) -> dict[str, Any]:
    """One axis value applied to a cell's request body."""
    field = HONOURED[label][0]
    if field == CLIP_SKIP:
        return {**cell, "override_settings": {**(cell.get("override_settings") or {}),
                                              "CLIP_stop_at_last_layers": value}}
    if field == STYLES:
        return {**cell, "styles": [*(cell.get("styles") or []), *(s.strip() for s in value.split(",") if s.strip())]}
    if field == SIZE:
        width, _, height = value.lower().partition("x")
        if not (width.strip().isdigit() and height.strip().isdigit()):
            raise NanoDiffusionError(f"X/Y/Z plot Size {value!r} is not WIDTHxHEIGHT: write e.g. 512x768")
        return {**cell, "width": int(width), "height": int(height)}
    return apply(cell, field, value, values)


def plot_cells(request: Txt2ImgRequest, axes: list[tuple[str, list]], args: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell's request body, X fastest, then Y, then Z: seeds fixed once (unless no_fixed_seeds), then moved
    along the axes that vary them."""
    base = {**request.model_dump(), "script_name": None, "script_args": []}
    if not args["no_fixed_seeds"]:
        base.update(seed=fixed_seed(base["seed"]), subseed=fixed_seed(base["subseed"]))
    sizes = [len(values) for _, values in axes]
    cells = []
    for iz, iy, ix in itertools.product(*(range(n) for n in reversed(sizes))):
        cell = base
        for (label, values), index in zip(axes, (ix, iy, iz)):
            if label != "Nothing":
                cell = set_value(cell, label, values[index], values)
        shift, stride = 0, 1   # the web UI's: seed + ix (+ iy * len(xs) (+ iz * len(xs) * len(ys))) as varied
        for index, size, letter in zip((ix, iy, iz), sizes, "xyz"):
            if args[f"vary_seeds_{letter}"]:
                shift, stride = shift + index * stride, stride * size
        if shift and cell["seed"] >= 0:
            cell = {**cell, "seed": cell["seed"] + shift}
        cells.append(cell)
    return cells


def plot_infotext(text: str, entries: list[tuple[str, str]]) -> str:
    """A cell's parameters text with the script's settings added, as the web UI's create_infotext writes them."""
    extra = ", ".join(f"{key}: {quote(value)}" for key, value in entries)
    return f"{text}, {extra}" if text else extra


def script_job(request: Txt2ImgRequest, pipeline: Any, options: dict[str, Any], limits: Limits, *, save: bool,
               styles: Any = None, library: Any = None) -> Job:
    """The X/Y/Z plot as one job: every cell checked with build_job, run in order, drawn as the web UI answers."""
    img2img = isinstance(request, Img2ImgRequest)
    args = script_args(request)
    if request.batch_size != 1 or request.n_iter != 1:
        raise NanoDiffusionError("the X/Y/Z plot draws one image per cell on this server: send batch_size 1 and "
                                 "n_iter 1")
    axes, entries, z_entries = [], [("Script", "X/Y/Z plot")], []
    for letter in "XYZ":
        low = letter.lower()
        label = axis_label(args[f"{low}_type"], letter, img2img)
        if label == "Nothing":
            axes.append((label, [0]))
            continue
        values, text = axis_values(label, args[f"{low}_values"], args[f"{low}_values_dropdown"], args["csv_mode"],
                                   letter)
        if label in SEED_AXES and not args["no_fixed_seeds"]:
            values = [fixed_seed(v) if v == -1 else v for v in values]
        axes.append((label, values))
        shown = [(f"{letter} Type", label), (f"{letter} Values", text)]
        if label in SEED_AXES and not args["no_fixed_seeds"]:
            shown.append((f"Fixed {letter} Values", ", ".join(str(v) for v in values)))
        (z_entries if letter == "Z" else entries).extend(shown)
    count = math.prod(len(values) for _, values in axes)
    if count > MAX_PLOT_CELLS:
        raise NanoDiffusionError(f"the X/Y/Z plot has {count} cells: use at most {MAX_PLOT_CELLS}")
    model = type(request)
    jobs = []
    for cell in plot_cells(request, axes, args):
        try:
            body = model.model_validate(cell)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise NanoDiffusionError(f"an X/Y/Z plot cell has {where} {problem.get('input')!r}: "
                                     f"{problem['msg']}") from None
        jobs.append(build_job(body, pipeline, options, limits, save=save, styles=styles, library=library))
    job = jobs[0]
    job.warnings = list(dict.fromkeys(w for cell in jobs for w in cell.warnings))
    draw = [("" if label == "Nothing" else label, [""] if label == "Nothing" else values) for label, values in axes]
    job.run = partial(run_plot, cells=[cell.kwargs for cell in jobs], axes=draw, args=args, entries=entries,
                      z_entries=z_entries, details=job.details)
    return job


def run_plot(pipeline: Any, *, cells: list[dict[str, Any]], axes: list[tuple[str, list]], args: dict[str, Any],
             entries: list[tuple[str, str]], z_entries: list[tuple[str, str]], details: dict[str, Any],
             callback: Any, **_: Any) -> list[Image.Image]:
    """What the worker runs: every cell (an interrupt leaves the rest black), then the grid, the sub-grids and the
    cells as the request asked; `details` gets the web UI's info lists (seeds and prompts of the cells)."""
    images = run_cells(pipeline, cells, callback, stop=(Interrupted,))
    done = [(cell, image) for cell, image in zip(cells, images) if image is not None]
    grids = xyz_grids(images, axes, legend=args["draw_legend"], margin=args["margin_size"])
    grid = join_grids(grids)
    first = done[0][1].info.get("parameters", "")
    grid.info["parameters"] = plot_infotext(first, entries + z_entries)
    subs = grids if args["include_sub_grids"] else []
    for sub in subs:
        sub.info["parameters"] = plot_infotext(first, entries)
    lone = [image for _, image in done] if args["include_lone_images"] else []
    details.update(
        seed=cells[0]["seed"], all_seeds=[cell["seed"] for cell, _ in done],
        all_prompts=[cell["prompt"] for cell, _ in done],
        all_negative_prompts=[cell["negative_prompt"] for cell, _ in done],
        infotexts=[image.info.get("parameters", "") for image in [grid, *subs]]
        + [image.info.get("parameters", "") for _, image in done], index_of_first_image=1)
    return [grid, *subs, *lone]
