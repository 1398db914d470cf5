"""The web page as its users expect it, in headless Chromium: PNG info (drop a PNG, send its parameters to
txt2img / img2img), settings kept across a reload, Ctrl+Enter in every box, the true queue position, batch count,
the optional controls (hires fix, styles, model picker), the X/Y/Z plot, and the output history (also its API).

Same browser launch as test_browser.py; skipped only when Debian's chromium is not installed.
"""

from __future__ import annotations

import base64
import io
import os
import threading

import httpx
from PIL import Image, PngImagePlugin
from test_browser import CHROMIUM_ARGS, browser  # noqa: F401 - the browser fixture
from test_server import FakePipeline, Recording, running

from nanodiffusion.server.app import create_app

WEBUI_TEXT = ('a "quoted" cat, masterpiece\nsecond line of the prompt\nNegative prompt: blurry, lowres\n'
              'Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 96x64, '
              'Model hash: 0123456789, Model: "my, model", Version: v1.10.0')
READY = "!document.getElementById('generate').disabled"
FINAL_IMAGE_SHOWN = """
(image => image.src.includes("/outputs/") && image.complete && image.naturalWidth > 0)(
  document.getElementById("preview"))
"""
DROP = """async (b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
  return transfer;
}"""


def png_bytes(parameters: str, *, size=(96, 64), compressed: bool = False) -> bytes:
    """A PNG whose "parameters" text chunk holds `parameters` (tEXt, or iTXt when not Latin-1 or compressed)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters, zip=compressed)
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def open_page(browser, url):  # noqa: F811 - the fixture's value
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.goto(url)
    page.wait_for_function(READY)
    return page


def test_dropped_png_restores_its_fields_in_txt2img_and_img2img(browser, tmp_path):  # noqa: F811
    with running(create_app(Recording(FakePipeline()), outputs=tmp_path)) as url:
        page = open_page(browser, url)
        transfer = page.evaluate_handle(DROP, base64.b64encode(png_bytes(WEBUI_TEXT)).decode())
        page.dispatch_event("#viewer", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#pnginfo-actions:not([hidden])")
        assert page.inner_text("#pnginfo-text") == WEBUI_TEXT
        page.click("#pnginfo-txt2img")
        assert page.input_value("#prompt") == 'a "quoted" cat, masterpiece\nsecond line of the prompt'
        assert page.input_value("#negative") == "blurry, lowres"
        fields = {name: page.input_value(f"#{name}") for name in ("steps", "cfg", "seed", "width", "height")}
        assert fields == {"steps": "12", "cfg": "6.5", "seed": "1234", "width": "96", "height": "64"}
        assert page.input_value("#sampler") == "DPM++ 2M" and page.input_value("#schedule").lower() == "karras"
        assert page.inner_text("#steps-value") == "12"
        assert page.get_attribute(".tab[data-mode=txt2img]", "class").endswith("active")

        text = "café 東京 at night\nSteps: 3, Sampler: DDIM, CFG scale: 4, Seed: 99, Size: 64x64, Denoising strength: 0.4"
        picked = tmp_path / "picked.png"
        picked.write_bytes(png_bytes(text, size=(64, 64), compressed=True))
        page.set_input_files("#pnginfo-file", str(picked))
        page.wait_for_function("document.getElementById('pnginfo-text').textContent.startsWith('café')")
        page.click("#pnginfo-img2img")
        page.wait_for_selector("#stack:not([hidden])")
        assert page.input_value("#prompt") == "café 東京 at night" and page.input_value("#negative") == ""
        assert page.input_value("#sampler") == "DDIM" and page.input_value("#strength") == "0.4"
        assert page.get_attribute(".tab[data-mode=img2img]", "class").endswith("active")

        plain = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(plain)
        page.set_input_files("#pnginfo-file", str(plain))
        page.wait_for_function("document.getElementById('pnginfo-text').textContent.includes('no \"parameters\"')")
        assert page.is_hidden("#pnginfo-actions")


def test_settings_prompt_tabs_and_gallery_survive_a_reload(browser, tmp_path):  # noqa: F811
    with running(create_app(Recording(FakePipeline()), outputs=tmp_path)) as url:
        page = open_page(browser, url)
        page.fill("#prompt", "a kept prompt")
        page.fill("#negative", "kept negative")
        page.select_option("#sampler", "DDIM")
        page.fill("#steps", "33")
        page.fill("#cfg", "9.5")
        page.fill("#seed", "77")
        page.fill("#n_iter", "3")
        page.fill("#width", "128")
        page.click("#generate")
        page.wait_for_function(FINAL_IMAGE_SHOWN, timeout=30_000)
        page.click(".tab[data-mode=img2img]")
        page.click(".view-tab[data-view=pnginfo]")
        page.reload()
        page.wait_for_function(READY)
        kept = {name: page.input_value(f"#{name}") for name in
                ("prompt", "negative", "sampler", "steps", "cfg", "seed", "n_iter", "width")}
        assert kept == {"prompt": "a kept prompt", "negative": "kept negative", "sampler": "DDIM", "steps": "33",
                        "cfg": "9.5", "seed": "77", "n_iter": "3", "width": "128"}
        assert page.inner_text("#steps-value") == "33"
        assert page.get_attribute(".tab[data-mode=img2img]", "class").endswith("active")
        assert page.is_visible("#source") and page.is_visible("#view-pnginfo") and page.is_hidden("#view-result")
        assert page.locator("#gallery .thumb").count() == 3, "the gallery of the last results was not kept"


class Gated(FakePipeline):
    """A fake model whose call for the prompt "hold" waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def __call__(self, prompt, *args, **kwargs):
        if prompt == "hold":
            assert self.release.wait(30), "the test never released the held job"
        return super().__call__(prompt, *args, **kwargs)


def test_ctrl_enter_in_any_box_and_the_true_queue_position(browser, tmp_path):  # noqa: F811
    pipe = Recording(Gated())
    app = create_app(pipe, outputs=tmp_path)
    with running(app) as url:
        page = open_page(browser, url)
        held = httpx.post(f"{url}/api/jobs", json={"prompt": "hold", "steps": 2}).json()
        page.fill("#prompt", "queued behind it")
        page.focus("#seed")
        page.keyboard.press("Control+Enter")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Queued: 1 job(s) ahead')")
        assert app.state.worker.jobs[held["id"]].status == "running"
        pipe.release.set()
        page.wait_for_function(FINAL_IMAGE_SHOWN, timeout=30_000)
        assert pipe.calls[-1]["prompt"] == "queued behind it"
        for box in ("#negative", "#width", "#n_iter"):
            calls = len(pipe.calls)
            page.focus(box)
            page.keyboard.press("Control+Enter")
            page.wait_for_function(f"document.querySelectorAll('#gallery .thumb').length === {calls}")
            page.wait_for_function(READY)
            assert len(pipe.calls) == calls + 1, f"Ctrl+Enter in {box} did not generate"


def test_batch_count_and_optional_controls_hidden_without_backend(browser, tmp_path):  # noqa: F811
    pipe = Recording(FakePipeline())
    with running(create_app(pipe, outputs=tmp_path)) as url:
        page = open_page(browser, url)
        assert page.is_hidden("#hires-field") and page.is_hidden("#styles-field") and page.is_hidden("#model-select")
        page.fill("#prompt", "two iterations")
        page.fill("#seed", "10")
        page.fill("#n_iter", "2")
        with page.expect_request("**/api/jobs") as request:
            page.click("#generate")
        body = request.value.post_data_json
        assert body["n_iter"] == 2 and "enable_hr" not in body and "styles" not in body
        page.wait_for_function(FINAL_IMAGE_SHOWN, timeout=30_000)
        assert [call["seed"] for call in pipe.calls] == [10, 11]
        assert page.locator("#gallery .thumb").count() == 2


class Hires(FakePipeline):
    """A fake model whose call takes a `hires` keyword, as the hires-fix Pipeline does."""

    def __call__(self, prompt, negative_prompt="", *, hires=None, **kwargs):
        return super().__call__(prompt, negative_prompt, **kwargs)


def test_hires_styles_and_model_sent_when_the_server_offers_them(browser, tmp_path):  # noqa: F811
    with running(create_app(Hires(), outputs=tmp_path)) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        answers = {"prompt-styles": [{"name": "Warm", "prompt": "{prompt}, warm", "negative_prompt": ""}],
                   "sd-models": [{"title": "fake-model [0123456789]"}, {"title": "other [abcdef0123]"}],
                   "latent-upscale-modes": [{"name": "Latent"}, {"name": "Latent (nearest)"}]}
        for name, answer in answers.items():
            page.route(f"**/sdapi/v1/{name}", lambda route, _request, answer=answer: route.fulfill(json=answer))
        page.goto(url)
        page.wait_for_function(READY)
        page.check("#enable_hr")
        page.fill("#hr_scale", "1.5")
        page.select_option("#hr_upscaler", "Latent (nearest)")
        page.fill("#hr_second_pass_steps", "3")
        page.fill("#hr_denoise", "0.55")
        page.check("#styles input[value=Warm]")
        page.select_option("#model-select", "other [abcdef0123]")
        with page.expect_request("**/api/jobs") as request:
            page.click("#generate")
        body = request.value.post_data_json
        assert {key: body.get(key) for key in ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
                                               "denoising_strength", "styles")} == {
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 3,
            "denoising_strength": 0.55, "styles": ["Warm"]}
        assert body["override_settings"] == {"sd_model_checkpoint": "other [abcdef0123]"}
        page.click(".tab[data-mode=img2img]")
        assert page.is_hidden("#hires-field")


def test_xyz_plot_in_the_browser_shows_the_labelled_grid(browser, tmp_path):  # noqa: F811
    pipe = Recording(FakePipeline())
    with running(create_app(pipe, outputs=tmp_path)) as url:
        page = open_page(browser, url)
        page.fill("#prompt", "a red circle")
        page.fill("#seed", "5")
        page.check("#xyz-enabled")
        page.select_option("#xyz-x-name", "steps")
        page.fill("#xyz-x-values", "2-3")
        page.select_option("#xyz-y-name", "sampler")
        page.fill("#xyz-y-values", "Euler, DDIM")
        page.click("#generate")
        page.wait_for_function(FINAL_IMAGE_SHOWN, timeout=30_000)
        assert [(c["steps"], c["sampler"], c["seed"]) for c in pipe.calls] == [
            (2, "Euler", 5), (3, "Euler", 5), (2, "DDIM", 5), (3, "DDIM", 5)]
        size = page.evaluate("[document.getElementById('preview').naturalWidth, "
                             "document.getElementById('preview').naturalHeight]")
        assert size[0] > 2 * 64 and size[1] > 2 * 64, "expected a 2x2 grid of 64 px cells with labels"
        assert "X Type: Steps" in page.inner_text("#parameters")
        saved = list(tmp_path.glob("*/*.png"))
        assert len(saved) == 1 and Image.open(saved[0]).size == tuple(size)

        page.fill("#xyz-x-values", "2-x")
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])")
        assert "'2-x' is not an integer" in page.inner_text("#error")


def saved_png(folder, name: str, parameters: str, modified: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(png_bytes(parameters, size=(16, 16)))
    os.utime(folder / name, (modified, modified))


def test_history_api_pages_newest_first_and_never_leaves_the_outputs_folder(tmp_path):
    outputs, outside = tmp_path / "outputs", tmp_path / "secret"
    saved_png(outputs / "2026-01-01", "00001-1.png", "oldest\nSteps: 1, Seed: 1, Sampler: Euler", 1_000)
    saved_png(outputs / "2026-01-02", "00001-2.png", "middle\nSteps: 2, Seed: 2, Sampler: Euler", 2_000)
    saved_png(outputs / "2026-01-02", "00002-3.png", "newest\nSteps: 3, Seed: 3, Sampler: Euler", 3_000)
    saved_png(outside, "private.png", "not yours", 4_000)
    (outputs / "2026-01-02" / "notes.txt").write_text("not an image")
    (outputs / "2026-01-02" / ".00003-4.png.1.tmp.png").write_bytes(b"half written")
    (outputs / "link.png").symlink_to(outside / "private.png")
    (outputs / "linked").symlink_to(outside)
    with running(create_app(FakePipeline(), outputs=outputs)) as url, httpx.Client(base_url=url) as client:
        first = client.get("/api/outputs", params={"per_page": 2}).json()
        assert (first["total"], first["pages"]) == (3, 2)
        assert [item["path"] for item in first["items"]] == ["2026-01-02/00002-3.png", "2026-01-02/00001-2.png"]
        assert first["items"][0]["parameters"].startswith("newest\n")
        second = client.get("/api/outputs", params={"per_page": 2, "page": 1}).json()
        assert [item["name"] for item in second["items"]] == ["00001-1.png"]
        image = client.get(first["items"][0]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        for path in ("/outputs/../secret/private.png", "/outputs/%2e%2e/secret/private.png", "/outputs/link.png",
                     "/outputs/linked/private.png"):
            assert client.get(path).status_code == 404, path
        assert client.get("/api/outputs", params={"per_page": 0}).status_code == 422
        assert client.get("/api/outputs", params={"page": -1}).status_code == 422


def test_history_view_opens_a_saved_image_and_sends_it_to_txt2img(browser, tmp_path):  # noqa: F811
    saved_png(tmp_path / "2026-01-01", "00001-8.png", "from history\nSteps: 8, Sampler: Euler, CFG scale: 3, Seed: 8", 1_000)
    saved_png(tmp_path / "2026-01-01", "00002-9.png", "newer\nSteps: 9, Sampler: Euler, CFG scale: 3, Seed: 9", 2_000)
    with running(create_app(FakePipeline(), outputs=tmp_path)) as url:
        page = open_page(browser, url)
        page.click(".view-tab[data-view=history]")
        page.wait_for_function("document.querySelectorAll('#history .thumb').length === 2")
        assert page.get_attribute("#history .thumb >> nth=0", "title") == "2026-01-01/00002-9.png"
        page.click("#history .thumb >> nth=1")
        assert page.is_visible("#view-result") and "from history" in page.inner_text("#parameters")
        page.click("#to-txt2img")
        assert page.input_value("#prompt") == "from history" and page.input_value("#steps") == "8"
        assert page.input_value("#seed") == "8"


def test_the_real_pipeline_offers_every_request_setting_to_the_page():
    """Pipeline.__call__ takes its settings as **settings (request.py): the page's optional controls (hires fix,
    ...) must see them, not an empty signature."""
    from nanodiffusion.pipeline import Pipeline
    from nanodiffusion.server.web import call_keywords

    assert {"hires", "n_iter", "subseed", "tiling", "mask_only"} <= call_keywords(Pipeline.load())
