"""The web UI's "X/Y/Z plot" script through /sdapi/v1 (script_name + script_args), against a real uvicorn server.

script_args follow AUTOMATIC1111/stable-diffusion-webui scripts/xyz_grid.py (v1.10) `Script.run(self, p, x_type,
x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend,
include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size,
csv_mode)`; a type indexes its `axis_options` as `ui(is_img2img)` filters them (AxisOptionTxt2Img / AxisOptionImg2Img
only in their mode): txt2img 0 Nothing, 1 Seed, 4 Steps, 6 CFG Scale, 7 Prompt S/R, 9 Sampler, 11 Checkpoint name,
13 Sigma Churn; img2img 6 Image CFG Scale, 7 Prompt S/R, 9 Sampler. The response is `draw_xyz_grid`'s Processed:
the grid first, the cells after it with include_lone_images, infotexts = [grid, cells...], index_of_first_image 1.
(Read from a mirror of the web UI's v1.10 file, chirag127/stable-diffusion-webui@5347a0d scripts/xyz_grid.py.)
"""

from __future__ import annotations

import json

import httpx
import pytest
from PIL import Image
from serving import b64_png, running
from test_server import FakePipeline, Recording, decode_png, in_thread, wait_for

from nanodiffusion.server.app import create_app
from nanodiffusion.server.schema import Limits
from nanodiffusion.server.xyz_script import axis_labels

NOTHING, SEED, STEPS, CFG, PROMPT_SR, PROMPT_ORDER, SAMPLER, CHECKPOINT, SIGMA_CHURN = 0, 1, 4, 6, 7, 8, 9, 11, 13
CLIP_SKIP, STYLES, SIZE = 24, 30, 41


def args(x_type=1, x_values="", y_type=0, y_values="", z_type=0, z_values="", **flags):
    """script_args in the web UI's positional order, its defaults for the flags not given."""
    defaults = dict(draw_legend=True, include_lone_images=False, include_sub_grids=False, no_fixed_seeds=False,
                    vary_seeds_x=False, vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
    defaults.update(flags)
    return [x_type, x_values, [], y_type, y_values, [], z_type, z_values, [], *defaults.values()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe = Recording(FakePipeline())
    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nink,"{prompt}, ink",\nsepia,sepia tone,\n')
    app = create_app(pipe, outputs=tmp_path_factory.mktemp("out"), limits=Limits(max_side=256, max_steps=50),
                     styles_file=styles)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        client.pipe = pipe
        yield client


def test_axis_indices_are_the_web_uis():
    txt2img, img2img = axis_labels(False), axis_labels(True)
    assert [txt2img[i] for i in (NOTHING, SEED, STEPS, CFG, PROMPT_SR, SAMPLER, CHECKPOINT, SIGMA_CHURN)] == [
        "Nothing", "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler", "Checkpoint name", "Sigma Churn"]
    assert (img2img[6], img2img[7], img2img[9]) == ("Image CFG Scale", "Prompt S/R", "Sampler")
    assert [txt2img[i] for i in (PROMPT_ORDER, CLIP_SKIP, STYLES, SIZE)] == ["Prompt order", "Clip skip", "Styles",
                                                                              "Size"]
    assert (len(txt2img), len(img2img)) == (42, 41) and txt2img[-1] == "Size" and "Hires steps" not in img2img


def test_scripts_and_script_info_list_the_plot(server):
    scripts = server.get("/sdapi/v1/scripts").json()
    assert "x/y/z plot" in scripts["txt2img"] and "x/y/z plot" in scripts["img2img"]
    info = [s for s in server.get("/sdapi/v1/script-info").json() if s["name"] == "x/y/z plot"]
    assert sorted(s["is_img2img"] for s in info) == [False, True] and not any(s["is_alwayson"] for s in info)
    txt2img = next(s for s in info if not s["is_img2img"])
    assert [a["label"] for a in txt2img["args"]][:3] == ["X type", "X values", "X values"]
    assert len(txt2img["args"]) == 18 and txt2img["args"][0]["value"] == "Seed"
    assert txt2img["args"][0]["choices"][STEPS] == "Steps" and txt2img["args"][16]["maximum"] == 500


def test_steps_by_cfg_grid_with_lone_images_and_infotexts(server):
    server.pipe.calls.clear()
    body = {"prompt": "a cat", "steps": 3, "seed": 7, "script_name": "X/Y/Z plot",
            "script_args": args(STEPS, "2-4", CFG, "3, 6", include_lone_images=True)}
    response = server.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 1 + 6
    grid, cells = decode_png(data["images"][0]), [decode_png(image) for image in data["images"][1:]]
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    calls = server.pipe.calls
    assert [(c["steps"], c["cfg"]) for c in calls] == [(2, 3), (3, 3), (4, 3), (2, 6), (3, 6), (4, 6)]
    assert {c["seed"] for c in calls} == {7}
    assert 'Script: X/Y/Z plot, X Type: Steps, X Values: 2-4, Y Type: CFG Scale, Y Values: "3, 6"' in (
        grid.info["parameters"])
    assert grid.info["parameters"].startswith("a cat\nSteps: 2")
    assert info["infotexts"][0] == grid.info["parameters"] and info["index_of_first_image"] == 1
    assert info["infotexts"][1:] == [cell.info["parameters"] for cell in cells] and info["all_seeds"] == [7] * 6
    assert len(info["all_prompts"]) == 6


def test_prompt_sr_seed_axis_without_legend_and_defaults(server):
    server.pipe.calls.clear()
    body = {"prompt": "a red ball", "steps": 2, "script_name": "x/y/z plot",
            "script_args": args(PROMPT_SR, "red, blue", SEED, "-1, 5", draw_legend=False)}
    data = server.post("/sdapi/v1/txt2img", json=body).json()
    grid = decode_png(data["images"][0])
    assert grid.size == (2 * 64, 2 * 64) and len(data["images"]) == 1   # no labels, no lone images
    calls = server.pipe.calls
    assert [c["prompt"] for c in calls] == ["a red ball", "a blue ball"] * 2
    fixed = calls[0]["seed"]
    assert [c["seed"] for c in calls] == [fixed, fixed, 5, 5] and fixed != -1
    assert f"Fixed Y Values: \"{fixed}, 5\"" in grid.info["parameters"]
    server.pipe.calls.clear()   # only x_type given: the rest are the web UI's defaults (a Seed axis)
    response = server.post("/sdapi/v1/txt2img", json={"steps": 1, "seed": 3, "script_name": "x/y/z plot",
                                                       "script_args": [SEED, "1, 2"]})
    assert response.status_code == 200 and [c["seed"] for c in server.pipe.calls] == [1, 2]


def test_vary_seeds_and_z_sub_grids(server):
    server.pipe.calls.clear()
    body = {"steps": 1, "seed": 100, "script_name": "x/y/z plot",
            "script_args": args(CFG, "1, 2", NOTHING, "", STEPS, "1, 2", vary_seeds_x=True, vary_seeds_z=True,
                                include_sub_grids=True)}
    data = server.post("/sdapi/v1/txt2img", json=body).json()
    assert [c["seed"] for c in server.pipe.calls] == [100, 101, 102, 103]
    info = json.loads(data["info"])
    assert len(data["images"]) == 3 and "Z Type: Steps" in info["infotexts"][0]
    assert "Z Type" not in info["infotexts"][1] and "X Type: CFG Scale" in info["infotexts"][1]


def test_img2img_plot_uses_the_img2img_axis_list(server):
    server.pipe.calls.clear()
    image = b64_png(Image.new("RGB", (64, 64), "red"))
    body = {"init_images": [image], "prompt": "a dog", "steps": 4, "script_name": "x/y/z plot",
            "script_args": args(CFG, "1, 2")}   # 6 is CFG Scale in txt2img, Image CFG Scale here
    response = server.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422 and "'Image CFG Scale'" in response.json()["detail"]
    body["script_args"] = args(7, "dog, cat", 9, "Euler, DDIM", csv_mode=True)
    response = server.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    assert [(c["prompt"], c["sampler"]) for c in server.pipe.calls] == [
        ("a dog", "Euler"), ("a cat", "Euler"), ("a dog", "DDIM"), ("a cat", "DDIM")]
    assert all(c["init_image"] is not None for c in server.pipe.calls)


@pytest.mark.parametrize("script_args, message", [
    (args(CHECKPOINT, "a, b"), "X axis 'Checkpoint name' is not available"),
    (args(STEPS, "1-2", SIGMA_CHURN, "0, 1"), "Y axis 'Sigma Churn' is not available"),
    (args(99, "1"), "x_type 99 is out of range"),
    (args(STEPS, "ten"), "'ten' is not an integer"),
    (args(STEPS, ""), "X (Steps) axis has no values"),
    (args(PROMPT_ORDER, "a, b, c, d, e, f, g"), "5040 orders"),
    (args(STEPS, "1-9", CFG, "1-9"), "81 cells"),
    (args(STEPS, "1, 99"), "steps 99 is out of range"),
    (args(STEPS, "1", margin_size=-2), "margin_size"),
    ([1] * 19, "at most 18 values"),
    (args(PROMPT_SR, "green, blue"), "Prompt S/R did not find 'green'"),
])
def test_what_cannot_run_is_a_422_naming_it(server, script_args, message):
    response = server.post("/sdapi/v1/txt2img", json={"prompt": "red", "steps": 2, "script_name": "x/y/z plot",
                                                       "script_args": script_args})
    assert response.status_code == 422 and message in response.json()["detail"], response.text


def test_other_scripts_are_still_refused(server):
    response = server.post("/sdapi/v1/txt2img", json={"script_name": "prompt matrix", "script_args": []})
    assert response.status_code == 422 and "script_name" in response.json()["detail"]


def test_prompt_order_styles_size_and_clip_skip_axes(server):
    def plot(prompt, script_args):
        server.pipe.calls.clear()
        response = server.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 1, "script_name": "x/y/z plot",
                                                           "script_args": script_args})
        assert response.status_code == 200, response.text
        return server.pipe.calls

    calls = plot("a red ball, big", args(PROMPT_ORDER, "red, big"))
    assert [c["prompt"] for c in calls] == ["a red ball, big", "a big ball, red"]
    calls = plot("cat", args(STYLES, "ink, sepia", SIZE, "64x64, 128x64"))
    assert [(c["prompt"], c["width"], c["height"]) for c in calls] == [
        ("cat, ink", 64, 64), ("cat, sepia tone", 64, 64), ("cat, ink", 128, 64), ("cat, sepia tone", 128, 64)]
    calls = plot("cat", args(CLIP_SKIP, "1-2"))
    assert [c["clip_skip"] for c in calls] == [1, 2]
    calls = plot("cat", [SAMPLER, "DDIM", ["Euler", "DDIM"]])   # a dropdown axis: its list, unless csv_mode
    assert [c["sampler"] for c in calls] == ["Euler", "DDIM"]
    calls = plot("cat", [SAMPLER, "DDIM, Euler", []])   # no list sent: the text (the web UI would fail)
    assert [c["sampler"] for c in calls] == ["DDIM", "Euler"]


def test_interrupt_draws_the_cells_done_and_leaves_the_rest_black(tmp_path):
    """As the web UI's cell(): once interrupted, the cells left are empty images in the grid."""
    pipe = FakePipeline(step_delay=0.03)
    with running(create_app(pipe, outputs=tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = {"seed": 9, "script_name": "x/y/z plot", "script_args": args(STEPS, "2, 40, 40", draw_legend=False)}
        call = in_thread(client.post, "/sdapi/v1/txt2img", json=body)
        wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 4)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        call["thread"].join(10)
    data = call["value"].json()
    info = json.loads(data["info"])
    grid = decode_png(data["images"][0])
    assert info["interrupted"] is True and info["all_seeds"] == [9] and grid.size == (3 * 64, 64)
    assert grid.getpixel((10, 10)) == (9, 100, 200)   # the first cell, done
    assert grid.getpixel((100, 10)) == grid.getpixel((170, 10)) == (0, 0, 0)   # the interrupted one and the last
    assert "X Type: Steps" in grid.info["parameters"] and "Seed: 9" in grid.info["parameters"]
