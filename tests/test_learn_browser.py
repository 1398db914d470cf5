"""The Learn tab in headless Chromium on the built-in model: generate, scrub to step 5, see a token's attention."""

from __future__ import annotations

from nanodiffusion.pipeline import Pipeline
from nanodiffusion.server.app import create_app
from test_browser import browser  # noqa: F401  (the headless Chromium fixture)
from test_server import running


def test_learn_tab_scrubs_steps_and_shows_token_attention(browser, tmp_path):  # noqa: F811
    with running(create_app(Pipeline.load(), outputs=tmp_path)) as url:
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(url)
        page.click("#learn-open")
        assert page.is_visible("#learn") and not page.is_visible("#form")
        page.fill("#learn-prompt", "a red circle above a blue square")
        page.fill("#learn-steps", "8")
        page.click("#learn-run")
        page.wait_for_selector("#learn-result:not([hidden])", timeout=120_000)
        first_xt = page.get_attribute("#learn-xt", "src")
        page.fill("#learn-step", "5")
        assert page.inner_text("#learn-step-value") == "5 / 8"
        assert page.get_attribute("#learn-xt", "src") != first_xt
        page.click(".learn-token:text-is('red')")
        red = page.get_attribute("#learn-attention", "src")
        assert page.inner_text("#learn-token-name") == '"red"' and red.startswith("data:image/png")
        assert page.evaluate("document.getElementById('learn-attention').naturalWidth") > 0
        page.click(".learn-token:text-is('square')")
        assert page.get_attribute("#learn-attention", "src") != red
        page.screenshot(path=str(tmp_path / "learn.png"))
