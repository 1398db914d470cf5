"""X/Y/Z plot: the web UI's axis value syntax, the cells, and a labelled grid drawn from the built-in model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.xyz import draw_xyz_grid, parse_axis, xyz_cells, xyz_plot


@pytest.mark.parametrize("name, text, expected", [
    ("steps", "1-5", [1, 2, 3, 4, 5]),
    ("steps", "1-5 (+2)", [1, 3, 5]),
    ("steps", "10-1 (-3)", [10, 7, 4, 1]),
    ("steps", "5-3", [5, 4, 3]),
    ("steps", "1-10 [5]", [1, 3, 5, 7, 10]),
    ("steps", "10, 20 ,30", [10, 20, 30]),
    ("steps", "1-3, 8, 20-30 (+5)", [1, 2, 3, 8, 20, 25, 30]),
    ("seed", "-1, 42", [-1, 42]),
    ("cfg", "1-2 (+0.25)", [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("cfg", "0-1 (+0.1)", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    ("cfg", "3-9 [4]", [3.0, 5.0, 7.0, 9.0]),
    ("cfg", "7.5", [7.5]),
    ("sampler", 'Euler a, "DPM++ 2M, odd name", DDIM', ["Euler a", "DPM++ 2M, odd name", "DDIM"]),
    ("prompt_sr", "red, blue,green", ["red", "blue", "green"]),
])
def test_axis_values_in_the_web_ui_syntax(name, text, expected):
    values = parse_axis(name, text)
    assert values == pytest.approx(expected) and [type(v) for v in values] == [type(v) for v in expected]


@pytest.mark.parametrize("name, text, message", [
    ("steps", "ten", "'ten' is not an integer"),
    ("steps", "1.5", "is not an integer"),
    ("cfg", "high", "is not a number"),
    ("steps", "1-5 (-1)", "never reaches its end"),
    ("steps", "1-100000", "use 1 to 1000"),
    ("steps", " , ", "has no values"),
    ("colour", "1", "unknown X/Y/Z axis 'colour'"),
])
def test_bad_axis_values_are_named(name, text, message):
    with pytest.raises(NanoDiffusionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_axis(name, text)


def test_cells_run_x_fastest_with_prompt_search_and_replace_and_one_seed():
    base = {"prompt": "a red circle", "negative_prompt": "red noise", "steps": 4, "seed": -1}
    cells = xyz_cells(base, [("prompt_sr", ["red", "blue"]), ("steps", [1, 2])])
    assert [(c["prompt"], c["negative_prompt"], c["steps"]) for c in cells] == [
        ("a red circle", "red noise", 1), ("a blue circle", "blue noise", 1),
        ("a red circle", "red noise", 2), ("a blue circle", "blue noise", 2)]
    assert len({c["seed"] for c in cells}) == 1 and cells[0]["seed"] >= 0
    with pytest.raises(NanoDiffusionError, match="Prompt S/R did not find 'green'"):
        xyz_cells(base, [("prompt_sr", ["green", "blue"])])
    with pytest.raises(NanoDiffusionError, match="one to three axes"):
        xyz_cells(base, [("steps", [1])] * 4)


def colour_cells(count: int, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i % 256, 200, 90)) for i in range(count)]


def test_z_grids_side_by_side_or_stacked():
    axes = [("steps", [1, 2]), ("cfg", [3.0, 7.0, 9.0]), ("sampler", ["Euler", "DDIM"])]
    row = draw_xyz_grid(colour_cells(12), axes)
    column = draw_xyz_grid(colour_cells(12), axes, stack=True)
    one = draw_xyz_grid(colour_cells(6), axes[:2])
    assert row.width == 2 * one.width + 16 and column.height > 2 * one.height + 16 > row.height
    assert one.width > 2 * 32 and one.height > 3 * 32   # room for the labels


def labels_ink(grid: Image.Image, box: tuple[int, int, int, int]) -> int:
    """How many dark (text) pixels a region of the grid holds."""
    return int((np.asarray(grid.convert("L").crop(box)) < 128).sum())


def test_plot_of_the_builtin_model_matches_single_generations():
    from nanodiffusion.pipeline import Pipeline

    pipe = Pipeline.load()
    base = {"prompt": "a red circle above a blue square", "seed": 7, "width": 64, "height": 64, "steps": 2}
    axes = [("steps", [1, 2]), ("cfg", [2.0, 7.0])]
    grid = xyz_plot(pipe, base, axes)
    assert "X Type: Steps" in grid.info["parameters"] and 'Y Values: "2, 7"' in grid.info["parameters"]
    left, top = grid.width - 2 * 64, grid.height - 2 * 64
    assert left > 0 and top > 0
    assert labels_ink(grid, (left, 0, grid.width, top)) > 20, "no column labels drawn"
    assert labels_ink(grid, (0, top, left, grid.height)) > 20, "no row labels drawn"
    alone = pipe("a red circle above a blue square", steps=1, cfg=7.0, seed=7, width=64, height=64)[0]
    cell = grid.crop((left, top + 64, left + 64, top + 128))
    assert np.array_equal(np.asarray(cell), np.asarray(alone)), "cell (steps 1, cfg 7) differs from the same call"
    first = grid.crop((left, top, left + 64, top + 64))
    assert not np.array_equal(np.asarray(first), np.asarray(cell)), "the Y axis changed nothing"


def test_prompt_order_axis_takes_every_order_of_its_words():
    orders = parse_axis("prompt_order", "red, big")
    assert orders == [("red", "big"), ("big", "red")]
    cells = xyz_cells({"prompt": "a red ball, big", "seed": 1}, [("prompt_order", orders)])
    assert [c["prompt"] for c in cells] == ["a red ball, big", "a big ball, red"]
    with pytest.raises(NanoDiffusionError, match="5040 orders"):
        parse_axis("prompt_order", "a, b, c, d, e, f, g")
    with pytest.raises(NanoDiffusionError, match="did not find 'blue'"):
        xyz_cells({"prompt": "a red ball"}, [("prompt_order", [("red", "blue")])])
