"""Streaming img2img (stream.py): stream batch = sequential steps, residual CFG, similarity filter, cached prompts,
layout-stage models, the tiny VAE, video / folder in and out, and the command's one-line errors."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from PIL import Image

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.layout import LayoutConfig, LayoutModel
from nanodiffusion.models.tiny_vae import TinyAutoencoder, TinyVAEConfig, vae_fingerprint
from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
from nanodiffusion.stream import (FrameWriter, StreamDiffusion, StreamSettings, load_tiny_vae, read_frames,
                                  residual_cfg, run_stream)
from tiny import tiny_pipeline

SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(SIZE)


def frames(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1 for _ in range(n)]


@pytest.mark.parametrize("guidance", ["self", "full", "none"])
def test_stream_batch_gives_each_frame_its_sequential_result(pipe, guidance):
    settings = StreamSettings(prompt="a red circle", steps=3, strength=0.6, cfg=2.5, guidance=guidance)
    batched = StreamDiffusion(pipe, settings)
    sequential = StreamDiffusion(pipe, dataclasses.replace(settings, stream_batch=False))
    latents = [batched.encode(f) for f in frames(6)]
    out_batched = [batched.denoise(z) for z in latents]
    out_sequential = [sequential.denoise(z) for z in latents]
    assert batched.calls == 6 and sequential.calls == 18
    for n in range(4):   # frame n comes out of the stream batch k - 1 = 2 frames later
        torch.testing.assert_close(out_batched[n + 2], out_sequential[n], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_sequential[0], out_sequential[1])


def test_residual_cfg_takes_the_added_noise_as_the_unconditional_prediction():
    noise = torch.randn(1, 4, 8, 8)
    z0, x0_cond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sigma = torch.tensor([2.0])
    guided = residual_cfg(lambda x, s, **cond: x0_cond, {}, 3.0, noise)
    x = z0 + 2.0 * noise
    torch.testing.assert_close(guided(x, sigma), z0 + 3.0 * (x0_cond - z0))
    torch.testing.assert_close(residual_cfg(lambda x, s, **cond: x0_cond, {}, 1.0, noise)(x, sigma), x0_cond)


def test_similarity_filter_skips_still_frames_but_not_changes(pipe):
    engine = StreamDiffusion(pipe, StreamSettings(prompt="a red circle", similarity=0.99, max_skip=3))
    still, moved = frames(2, seed=1)
    first = engine(still)
    outputs = [engine(still + 1e-4) for _ in range(3)]
    assert engine.calls == 1 and engine.skipped == 3 and all(o is first for o in outputs)
    engine(still)                       # after max_skip skips a frame is processed again
    assert engine.calls == 2
    engine(moved)
    assert engine.calls == 3 and engine.skipped == 3


def test_prompt_embeddings_are_cached_unless_turned_off(pipe, monkeypatch):
    encoded = []
    original = pipe.encode_text
    monkeypatch.setattr(pipe, "encode_text", lambda *a: encoded.append(a) or original(*a))
    for cache, expected in ((True, 1), (False, 5)):
        encoded.clear()
        engine = StreamDiffusion(pipe, StreamSettings(prompt="a blue square", cache_prompt=cache))
        for frame in frames(4):
            engine(frame)
        assert len(encoded) == expected
    engine.reset(dataclasses.replace(engine.settings, prompt="a red square", cache_prompt=True))
    assert encoded[-1][0] == ["a red square"]


def test_a_layout_stage_model_streams(pipe):
    layout = LayoutModel(LayoutConfig(context_dim=32, dim=32, heads=2, slot_layers=1, box_layers=1, map_channels=3,
                                      sample_steps=2)).eval()
    unet = UNet2DConditionModel(UNetConfig.tiny(sample_size=SIZE // 2, in_channels=7)).eval()
    with_layout = dataclasses.replace(pipe, unet=unet, layout=layout)
    engine = StreamDiffusion(with_layout, StreamSettings(prompt="a red circle above a blue square", steps=2))
    assert engine.cond["layout"].shape == (1, 3, SIZE // 2, SIZE // 2)
    out = [engine(f) for f in frames(3)]
    assert out[-1].size == (SIZE, SIZE)


def test_tiny_vae_is_used_and_must_fit_its_teacher(pipe, tmp_path):
    tiny = TinyAutoencoder(TinyVAEConfig(levels=1, channels=8, teacher=vae_fingerprint(pipe.vae)))
    tiny.save(tmp_path / "tiny")
    loaded = load_tiny_vae(pipe, str(tmp_path / "tiny"))
    engine = StreamDiffusion(pipe, StreamSettings(prompt="a red circle"), loaded)
    frame = frames(1)[0]
    torch.testing.assert_close(engine.encode(frame), tiny.encode(frame))
    assert engine.decode(engine.encode(frame)).shape == frame.shape
    other = tiny_pipeline(SIZE)
    torch.nn.init.normal_(other.vae.decoder.conv_out.weight)
    with pytest.raises(NanoDiffusionError, match="distilled from another VAE"):
        load_tiny_vae(other, str(tmp_path / "tiny"))
    assert load_tiny_vae(other, "none") is None


def test_tiny_vae_distillation_learns(tmp_path):
    from nanodiffusion.train.loop import TrainConfig
    from nanodiffusion.train.tiny_vae import train_tiny_vae

    config = TrainConfig(output=tmp_path, steps=12, batch_size=4, lr=2e-3, warmup=1, log_every=1,
                         checkpoint_every=100, preview_every=0)
    student = train_tiny_vae(config, channels=8, dataset_size=64)
    losses = [float(line.split(",")[1]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert TinyAutoencoder.load(tmp_path / "tiny-vae").config.teacher == student.config.teacher != ""


def test_video_in_video_out_and_folder_in_folder_out(pipe, tmp_path):
    pytest.importorskip("av")
    writer = FrameWriter(tmp_path / "in.mp4", fps=10)
    for i in range(5):
        writer.write(Image.new("RGB", (SIZE, SIZE), (40 * i, 100, 200)))
    writer.close()
    video = list(read_frames(tmp_path / "in.mp4"))
    assert len(video) == 5 and video[0].size == (SIZE, SIZE)
    engine = StreamDiffusion(pipe, StreamSettings(prompt="a red circle"))
    out = FrameWriter(tmp_path / "out")
    stats = run_stream(engine, video, out.write)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert len(list(read_frames(tmp_path / "out"))) == 5
    summary = stats.summary()
    assert summary["frames"] == 5 and summary["fps"] > 0 and summary["latency_ms_p95"] >= summary["latency_ms_median"]


def test_stream_command_and_its_errors(tmp_path, capsys):
    from nanodiffusion.cli import main

    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 50, 50)).save(tmp_path / "frames" / f"{i}.png")
    assert main(["stream", str(tmp_path / "frames"), "-o", str(tmp_path / "out"), "--prompt", "a red circle",
                 "--steps", "1", "--tiny-vae", "none"]) == 0
    assert "stream: 3 frames" in capsys.readouterr().out and len(list((tmp_path / "out").glob("*.png"))) == 3
    assert main(["stream", str(tmp_path / "missing.mp4")]) == 2
    assert main(["stream", str(tmp_path / "frames"), "--steps", "9"]) == 2
    assert "steps 9 is not allowed" in capsys.readouterr().err


RECORD_FRAMES = """
window.liveOutputs = [];
window.addEventListener("live-frame", () =>
  window.liveOutputs.push(document.getElementById("live-output").toDataURL()));
"""


def stroke(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end[0], box["y"] + box["height"] * end[1], steps=6)
    page.mouse.up()


def test_live_tab_in_a_browser_diffuses_canvas_strokes_and_shows_fps(pipe, tmp_path):
    from test_browser import CHROMIUM, CHROMIUM_ARGS
    from test_server import running

    from nanodiffusion.server.app import create_app

    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    app = create_app(pipe, outputs=tmp_path)
    with sync_playwright() as playwright, running(app) as url:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.add_init_script(RECORD_FRAMES)
        page.goto(url)
        page.click("#live-open")
        assert page.is_visible("#live-draw") and not page.is_visible("#form")
        stroke(page, "#live-draw", (0.2, 0.2), (0.8, 0.3))
        page.click("#live-start")
        page.wait_for_function("window.liveOutputs.length >= 2", timeout=180_000)
        stats = page.inner_text("#live-stats")
        assert re.match(r"\d+\.\d FPS · latency \d+ ms \(server [\d.]+ ms\)", stats), stats
        engine = app.state.live_stream.engine
        drawn = engine.last_input
        assert float(drawn.std()) > 0.1 and engine.settings.steps == 2   # the strokes reached the server
        page.fill("#live-color", "#2040e0")
        stroke(page, "#live-draw", (0.3, 0.9), (0.6, 0.5))
        page.fill("#live-prompt", "a blue square")
        seen = page.evaluate("window.liveOutputs.length")
        page.wait_for_function(f"window.liveOutputs.length >= {seen + 2}", timeout=180_000)
        assert engine.settings.prompt == "a blue square"
        assert not torch.equal(engine.last_input, drawn)
        outputs = page.evaluate("window.liveOutputs")
        assert len(set(outputs)) >= 2, "the diffused frames never changed"
        page.click("#live-start")   # stop
        browser.close()


def test_stream_endpoint_answers_frames_and_refuses_bad_ones(pipe, tmp_path):
    import io

    from fastapi.testclient import TestClient

    from nanodiffusion.server.app import create_app

    client = TestClient(create_app(pipe, outputs=tmp_path))
    buffer = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buffer, format="PNG")
    answer = client.post("/api/stream/frame?prompt=a%20red%20circle&steps=1", content=buffer.getvalue())
    assert answer.status_code == 200 and float(answer.headers["X-Stream-Ms"]) > 0
    assert Image.open(io.BytesIO(answer.content)).size == (SIZE, SIZE)
    assert client.post("/api/stream/frame", content=b"not an image").status_code == 400
    refused = client.post("/api/stream/frame?steps=9", content=buffer.getvalue())
    assert refused.status_code == 400 and "steps 9 is not allowed" in refused.json()["detail"]
