"""End to end in a real browser: headless Chromium opens the web UI, generates, watches live previews.

Skipped only when Debian's chromium is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nanodiffusion.server.app import create_app
from test_server import FakePipeline, Recording, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

RECORD_PREVIEWS = """
window.previewsSeen = [];
document.addEventListener("DOMContentLoaded", () => {
  const image = document.getElementById("preview");
  new MutationObserver(() => window.previewsSeen.push(image.src))
    .observe(image, { attributes: true, attributeFilter: ["src"] });
});
"""
FINAL_IMAGE_SHOWN = """
(image => image.src.includes("/outputs/") && image.complete && image.naturalWidth > 0)(
  document.getElementById("preview"))
"""


def builtin() -> Recording:
    """The real built-in model (a load failure fails the test: no silent stand-in)."""
    from nanodiffusion.pipeline import Pipeline

    return Recording(Pipeline.load())


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_generate_in_browser_with_live_previews(browser, tmp_path):
    pipe = builtin()
    with running(create_app(pipe, outputs=tmp_path)) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.add_init_script(RECORD_PREVIEWS)
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")
        page.fill("#prompt", "a red circle above a blue square")
        page.fill("#negative", "blurry")
        page.fill("#steps", "20")
        page.fill("#seed", "42")
        page.select_option("#schedule", "karras")
        page.click("#generate")

        page.wait_for_function(FINAL_IMAGE_SHOWN, timeout=60_000)
        previews = [src for src in page.evaluate("window.previewsSeen") if src.startswith("data:image/png")]
        assert len(set(previews)) >= 2, "expected at least two different live previews"
        final = page.locator("#preview")
        assert page.evaluate("document.getElementById('preview').naturalWidth") == pipe.default_size
        assert final.get_attribute("src").endswith("-42.png")
        assert page.locator(".thumb").count() == 1
        parameters = page.inner_text("#parameters")
        assert "a red circle above a blue square" in parameters and "Seed: 42" in parameters
        assert page.inner_text("#status").startswith("Done")
        assert page.get_attribute("#download", "href") == final.get_attribute("src")
        call = pipe.calls[-1]
        assert (call["steps"], call["seed"], call["schedule"], call["negative_prompt"]) == (20, 42, "karras", "blurry")
        assert list(tmp_path.glob("*/00001-42.png")), "the image was not saved under the outputs folder"
        page.screenshot(path=str(tmp_path / "webui.png"))   # the README's docs/webui.png is made by hand, not here


def test_inpaint_tab_sends_image_and_painted_mask(browser, tmp_path):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (30, 120, 220)).save(init)
    pipe = Recording(FakePipeline())
    with running(create_app(pipe, outputs=tmp_path / "out")) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 1")
        page.click(".tab[data-mode=inpaint]")
        page.set_input_files("#init-file", str(init))
        page.wait_for_selector("#stack:not([hidden])")
        assert page.input_value("#width") == "96" and page.input_value("#height") == "64"
        page.click("#generate")
        assert "Paint over the area" in page.inner_text("#error")
        box = page.locator("#mask").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 5)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] - 5, steps=8)
        page.mouse.up()
        page.fill("#mask-blur", "0")
        page.click("#generate")
        page.wait_for_function(FINAL_IMAGE_SHOWN, timeout=30_000)
        call = pipe.calls[-1]
        assert call["init_image"].size == (96, 64) and call["mask"] is not None
        mask = call["mask"].convert("L")
        assert mask.getpixel((5, 32)) == 0 and mask.crop((60, 0, 96, 64)).getextrema()[1] == 255
