"""The HTTP API and serving discipline, through a real HTTP client against a real uvicorn server.

The server runs a small fake pipeline (same call signature as Pipeline: coloured images, one callback per
step, a decode for previews) so these tests exercise the server layer in seconds.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from datetime import date

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from serving import b64_png, running

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.images import to_pil
from nanodiffusion.server.app import create_app
from nanodiffusion.server.guard import LOOPBACK_HOSTS, allowed_hosts_for
from nanodiffusion.server.schema import Limits


class FakePipeline:
    """Pipeline stand-in: a colour per seed, x0 previews that brighten step by step, optional delay."""

    name = "fake-model"
    model_hash = "0123456789abcdef" * 4
    default_size = 64
    default_cfg = 5.0
    clip_skip = 1
    precision = "float32"
    is_inpainting_model = False
    controlnet = None
    lora_dir = None

    def __init__(self, step_delay: float = 0.0) -> None:
        self.step_delay = step_delay

    def __call__(self, prompt, negative_prompt="", *, steps=20, sampler="euler_a", schedule="default", cfg=None,
                 seed=None, width=None, height=None, batch=1, init_image=None, strength=0.75, mask=None,
                 eta=None, clip_skip=None, control_image=None, control_scale=1.0, callback=None, progress=False):
        width, height = width or self.default_size, height or self.default_size
        if "[bad]" in prompt:
            raise NanoDiffusionError("the prompt contains [bad]: remove it")
        total = steps if init_image is None else max(1, int(steps * strength))
        for step in range(1, total + 1):
            time.sleep(self.step_delay)
            if callback is not None:
                callback(step, total, torch.full((batch, 3, height // 8, width // 8), -1 + 2 * step / total))
        images = []
        for i in range(batch):
            image = Image.new("RGB", (width, height), ((seed + i) % 256, 100, 200))
            image.info["parameters"] = f"{prompt}\nSteps: {steps}, Sampler: {sampler}, Seed: {seed + i}"
            images.append(image)
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels: upsample by 8, like a VAE's spatial factor."""
        return torch.nn.functional.interpolate(latents, scale_factor=8)

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.decode(latents))


class Recording:
    """Any pipeline, with the arguments of every call recorded in `calls`."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.calls: list[dict] = []

    def __call__(self, prompt, negative_prompt="", **kwargs):
        self.calls.append(dict(prompt=prompt, negative_prompt=negative_prompt, **kwargs))
        return self.pipeline(prompt, negative_prompt, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


@pytest.fixture(scope="module")
def fake():
    return Recording(FakePipeline(step_delay=0.005))


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    app = create_app(fake, outputs=outputs, limits=Limits(max_side=256, max_steps=50, max_batch=4, max_n_iter=4))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.outputs = outputs
        yield client


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A server whose model takes 40 ms a step and whose queue holds one waiting job."""
    pipe = Recording(FakePipeline(step_delay=0.04))
    app = create_app(pipe, outputs=tmp_path_factory.mktemp("slow"), max_queue=1)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.pipe = pipe
        yield client


def in_thread(function, *args, **kwargs) -> dict:
    """Run a blocking call in a thread; the returned dict gets its result under "value"."""
    box: dict = {}
    box["thread"] = threading.Thread(target=lambda: box.update(value=function(*args, **kwargs)), daemon=True)
    box["thread"].start()
    return box


def wait_for(predicate, timeout: float = 10.0):
    """Poll until predicate() is truthy; return its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_txt2img_returns_webui_response(server, fake):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "sampler_name": "Euler a", "steps": 6,
            "cfg_scale": 6.5, "seed": 1234, "width": 64, "height": 48, "batch_size": 2, "n_iter": 2,
            "enable_hr": False, "restore_faces": False, "script_args": [], "alwayson_scripts": {}}
    response = server.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    images = [decode_png(text) for text in data["images"]]
    assert [image.size for image in images] == [(64, 48)] * 4
    assert "Seed: 1235" in images[1].info["parameters"]
    assert data["parameters"]["prompt"] == "a red circle" and data["parameters"]["enable_hr"] is False
    info = json.loads(data["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert info["all_prompts"] == ["a red circle"] * 4 and info["negative_prompt"] == "blurry"
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6.5 and info["steps"] == 6
    assert (info["width"], info["height"]) == (64, 48) and len(info["infotexts"]) == 4
    calls = fake.calls[-2:]
    assert [c["seed"] for c in calls] == [1234, 1236] and calls[0]["sampler"] == "Euler a"
    assert calls[0]["negative_prompt"] == "blurry" and calls[0]["batch"] == 2 and calls[0]["init_image"] is None


def test_random_seed_and_defaults(server, fake):
    data = server.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1, "steps": 2}).json()
    info = json.loads(data["info"])
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]
    call = fake.calls[-1]
    assert call["seed"] == info["seed"] and call["cfg"] == fake.default_cfg
    assert (call["width"], call["height"]) == (fake.default_size, fake.default_size)
    assert data["images"] and not server.post("/sdapi/v1/txt2img", json={"steps": 2, "send_images": False}).json()["images"]


def test_img2img_inpaint_accepts_data_url_and_bare_base64(server, fake):
    init = Image.new("RGB", (40, 32), (10, 200, 30))
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (0, 0, 20, 32))
    body = {"prompt": "p", "init_images": ["data:image/png;base64," + b64_png(init)], "mask": b64_png(mask),
            "denoising_strength": 0.5, "steps": 8, "mask_blur": 0, "inpainting_mask_invert": 1,
            "resize_mode": 0, "inpaint_full_res_padding": 32}
    response = server.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert decode_png(data["images"][0]).size == (40, 32)
    assert data["parameters"]["init_images"] is None and data["parameters"]["mask"] is None
    call = fake.calls[-1]
    assert call["strength"] == 0.5 and call["init_image"].size == (40, 32)
    assert call["mask"].getpixel((5, 5)) == 0 and call["mask"].getpixel((35, 5)) == 255  # inverted
    assert json.loads(data["info"])["denoising_strength"] == 0.5


def test_inpainting_fill_paints_the_hole_with_its_surroundings(server, fake):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    init.paste((0, 0, 255), (16, 16, 48, 48))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"init_images": [b64_png(init)], "mask": b64_png(mask), "mask_blur": 0, "steps": 2}
    assert server.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 1}).status_code == 200
    assert fake.calls[-1]["init_image"].getpixel((32, 32)) == (0, 0, 255)  # "original": untouched
    assert server.post("/sdapi/v1/img2img", json=body).status_code == 200  # default 0, "fill"
    red, green, blue = fake.calls[-1]["init_image"].getpixel((32, 32))
    assert red > 150 and blue < 60 and fake.calls[-1]["init_image"].getpixel((2, 2)) == (200, 30, 30)


def test_img2img_rejects_bad_images(server):
    response = server.post("/sdapi/v1/img2img", json={"init_images": ["not an image"]})
    assert response.status_code == 422 and "init_images[0]" in response.json()["detail"]
    response = server.post("/sdapi/v1/img2img", json={"prompt": "no image"})
    assert response.status_code == 422 and "init_images" in response.json()["detail"]


def test_sampler_names_and_schedulers(server, fake):
    assert server.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM++ 2M Karras", "steps": 2}).status_code == 200
    assert (fake.calls[-1]["sampler"], fake.calls[-1]["schedule"]) == ("DPM++ 2M", "karras")
    server.post("/sdapi/v1/txt2img", json={"sampler_index": "Euler", "scheduler": "exponential", "steps": 2})
    assert (fake.calls[-1]["sampler"], fake.calls[-1]["schedule"]) == ("Euler", "exponential")
    server.post("/sdapi/v1/txt2img", json={"sampler_name": "DDIM", "scheduler": "normal", "steps": 2})
    assert (fake.calls[-1]["sampler"], fake.calls[-1]["schedule"]) == ("DDIM", "default")
    server.post("/sdapi/v1/txt2img", json={"sampler_name": "k_dpmpp_2m", "steps": 2})   # Automatic -> Karras
    assert (fake.calls[-1]["sampler"], fake.calls[-1]["schedule"]) == ("DPM++ 2M", "karras")
    response = server.post("/sdapi/v1/txt2img", json={"sampler_name": "Nope 3000", "steps": 2})
    info = json.loads(response.json()["info"])   # the web UI's fall-back, named in info
    assert response.status_code == 200 and fake.calls[-1]["sampler"] == "DPM++ 2M"
    assert info["warnings"] == ["sampler 'Nope 3000' is unknown: used DPM++ 2M"]
    response = server.post("/sdapi/v1/txt2img", json={"sampler_name": "Euler", "scheduler": "sgm_uniform", "steps": 2})
    info = json.loads(response.json()["info"])
    assert fake.calls[-1]["schedule"] == "default" and info["scheduler"] == "Uniform"
    assert "'sgm_uniform' is not implemented here: used Uniform" in info["warnings"][0]


def test_catalog_endpoints(server, fake):
    from nanodiffusion.samplers import SAMPLERS

    samplers = server.get("/sdapi/v1/samplers").json()
    assert {s["name"] for s in samplers} == {info.display_name for info in SAMPLERS.values()}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in server.get("/sdapi/v1/schedulers").json()}
    model = server.get("/sdapi/v1/sd-models").json()[0]
    assert model["title"] == f"fake-model [{fake.model_hash[:10]}]" and model["sha256"] == fake.model_hash
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(model)


def test_options_roundtrip(server, fake):
    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("fake-model")
    response = server.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "some_unknown_setting": 1})
    assert response.status_code == 200
    refused = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert refused.status_code == 422 and options["sd_model_checkpoint"] in refused.json()["detail"]
    refused = server.post("/sdapi/v1/options", json={"samples_format": "jpg"})
    assert refused.status_code == 422 and "samples_format is fixed" in refused.json()["detail"]
    posted_back = {**options, "CLIP_stop_at_last_layers": 2}   # Open WebUI posts back what it got
    assert server.post("/sdapi/v1/options", json=posted_back).status_code == 200
    assert server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    server.post("/sdapi/v1/txt2img", json={"steps": 2})
    assert fake.calls[-1]["clip_skip"] == 2
    server.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    assert server.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "many"}).status_code == 422


@pytest.mark.parametrize("field, value", [("width", 1000), ("width", 512), ("height", 0), ("steps", 0),
                                          ("steps", 51), ("batch_size", 5), ("n_iter", 0), ("cfg_scale", 99)])
def test_limits_give_clear_422(server, field, value):
    response = server.post("/sdapi/v1/txt2img", json={"steps": 2, field: value})
    assert response.status_code == 422
    assert field in response.json()["detail"] and str(value) in response.json()["detail"]


def test_pipeline_error_is_400_and_worker_survives(server):
    response = server.post("/sdapi/v1/txt2img", json={"prompt": "[bad]", "steps": 2})
    assert response.status_code == 400 and "remove it" in response.json()["detail"]
    assert server.post("/sdapi/v1/txt2img", json={"prompt": "fine", "steps": 2}).status_code == 200


def test_progress_previews_and_interrupt(slow):
    call = in_thread(slow.post, "/sdapi/v1/txt2img", json={"prompt": "p", "steps": 60, "seed": 3})
    first = wait_for(lambda: (p := slow.get("/sdapi/v1/progress").json())["state"]["sampling_step"] >= 2 and p)
    second = wait_for(lambda: (p := slow.get("/sdapi/v1/progress").json())["state"]["sampling_step"]
                      > first["state"]["sampling_step"] + 2 and p)
    assert 0 < first["progress"] < second["progress"] < 1 and second["eta_relative"] > 0
    assert first["state"]["sampling_steps"] == 60 and first["state"]["job_count"] == 1
    previews = [decode_png(p["current_image"]) for p in (first, second)]
    assert previews[0].size == (64, 64) and previews[0].getpixel((0, 0)) != previews[1].getpixel((0, 0))
    assert slow.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert slow.post("/sdapi/v1/interrupt").status_code == 200
    call["thread"].join(10)
    data = call["value"].json()
    info = json.loads(data["info"])   # the web UI returns the image as far as it got (SillyTavern reads it)
    assert len(data["images"]) == 1 and info["interrupted"] is True and info["all_seeds"] == [3]
    partial = decode_png(data["images"][0])
    assert partial.size == (64, 64) and 0 < partial.getpixel((0, 0))[0] < 255   # x0 of a step, not the end
    text = partial.info["parameters"]   # carries its settings like a finished image
    assert text.startswith("p\nSteps: 60, Sampler: Euler, Schedule type: Uniform, CFG scale: 5")
    assert "Seed: 3, Size: 64x64" in text
    assert info["infotexts"] == [text]
    assert slow.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_skip_moves_to_next_iteration(slow):
    call = in_thread(slow.post, "/sdapi/v1/txt2img", json={"steps": 30, "seed": 10, "n_iter": 2})
    wait_for(lambda: slow.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2)
    slow.post("/sdapi/v1/skip")
    call["thread"].join(10)
    info = json.loads(call["value"].json()["info"])
    assert info["all_seeds"] == [11] and "Seed: 11" in info["infotexts"][0]


def test_queue_full_is_429_and_cancel(slow):
    body = {"prompt": "q", "steps": 150}
    first = slow.post("/api/jobs", json=body)
    assert first.status_code == 200 and first.json()["position"] == 1
    first = first.json()
    wait_for(lambda: slow.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
    second = slow.post("/api/jobs", json=body)
    assert second.status_code == 200 and second.json()["position"] == 1
    third = slow.post("/api/jobs", json=body)
    assert third.status_code == 429 and "queue is full" in third.json()["detail"]
    assert slow.post("/sdapi/v1/txt2img", json=body).status_code == 429
    assert slow.post(f"/api/jobs/{second.json()['id']}/cancel").json()["status"] == "cancelled"
    slow.post(f"/api/jobs/{first['id']}/cancel")
    wait_for(lambda: slow.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0)
    assert slow.post("/api/jobs/nope/cancel").status_code == 404


def sse_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Read a job's server-sent events until the stream ends."""
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_web_job_streams_previews_and_saves_outputs(slow):
    job = slow.post("/api/jobs", json={"prompt": "../../etc/passwd", "steps": 12, "seed": 77, "batch_size": 2})
    events = sse_events(slow, job.json()["id"])
    previews = {e["preview"] for e in events if "preview" in e}
    assert len(previews) >= 2 and all(p.startswith("data:image/png;base64,") for p in previews)
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 12 and len(set(steps)) > 2
    final = events[-1]
    assert final["status"] == "done" and len(final["images"]) == 2
    day = date.today().isoformat()
    for image, seed in zip(final["images"], (77, 78)):
        assert re.fullmatch(rf"/outputs/{day}/\d{{5}}-{seed}\.png", image["url"])
        png = slow.get(image["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).info["parameters"] == image["parameters"]
    assert slow.get("/outputs/../../etc/passwd").status_code == 404


def test_page_docs_and_config(server, fake):
    page = server.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert server.get("/static/app.js").status_code == 200 and server.get("/static/style.css").status_code == 200
    docs = server.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text  # offline: Swagger UI from the installed bundle
    assert server.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/sdapi/v1/txt2img" in server.get("/openapi.json").json()["paths"]
    config = server.get("/api/config").json()
    assert config["default_size"] == fake.default_size and config["limits"]["max_side"] == 256


def test_cross_origin_writes_refused(server):
    url = str(server.base_url).rstrip("/")
    for origin in ("http://evil.example", "http://127.0.0.1:1", "null", "https://" + url.split("//")[1]):
        response = server.post("/sdapi/v1/interrupt", headers={"Origin": origin})
        assert response.status_code == 403 and "cross-origin" in response.json()["detail"]
    assert server.post("/sdapi/v1/interrupt", headers={"Origin": url}).status_code == 200
    assert server.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"}).status_code == 200


def test_body_size_limit_413(tmp_path):
    with running(create_app(FakePipeline(), outputs=tmp_path, max_body=50_000)) as url:
        with httpx.Client(base_url=url) as client:
            big = {"prompt": "x" * 60_000}
            assert client.post("/sdapi/v1/txt2img", json=big).status_code == 413
            chunked = client.post("/sdapi/v1/txt2img", content=(b"x" * 10_000 for _ in range(6)))
            assert chunked.status_code == 413 and "larger than 50000" in chunked.json()["detail"]
            assert client.post("/sdapi/v1/txt2img", json={"prompt": "small", "steps": 1}).status_code == 200


def test_basic_auth(tmp_path):
    with running(create_app(FakePipeline(), outputs=tmp_path, auth="alice:s3cret,bob:pw")) as url:
        with httpx.Client(base_url=url) as client:
            response = client.get("/sdapi/v1/options")
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
            assert response.json() == {"error": "HTTPException", "detail": "authentication required", "body": "",
                                       "errors": "401: authentication required"}   # the web UI's error shape
            assert client.get("/").status_code == 200   # --api-auth locks the API only, as in the web UI
            assert client.get("/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
            assert client.get("/sdapi/v1/samplers", auth=("alice", "s3cret")).status_code == 200
            assert client.post("/sdapi/v1/txt2img", auth=("bob", "pw"), json={"steps": 1}).status_code == 200
    with pytest.raises(NanoDiffusionError, match="USER:PASS"):
        create_app(FakePipeline(), outputs=tmp_path, auth="no-colon")


def test_gradio_auth_locks_the_web_page_only(tmp_path):
    with running(create_app(FakePipeline(), outputs=tmp_path, ui_auth="carol:pw")) as url:
        with httpx.Client(base_url=url) as client:
            assert client.get("/").status_code == 401 and client.get("/api/config").status_code == 401
            assert client.get("/", auth=("carol", "pw")).status_code == 200
            assert client.get("/sdapi/v1/cmd-flags").status_code == 200
    with pytest.raises(NanoDiffusionError, match="--gradio-auth must look like USER:PASS"):
        create_app(FakePipeline(), outputs=tmp_path, ui_auth="carol")


def test_cors_allows_the_named_origins_only(tmp_path):
    app = create_app(FakePipeline(), outputs=tmp_path, cors_allow_origins=["http://app.example"],
                     cors_allow_origins_regex=r"https://.*\.trusted\.example")
    with running(app) as url, httpx.Client(base_url=url) as client:
        preflight = client.options("/sdapi/v1/txt2img", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        for origin in ("http://app.example", "https://ui.trusted.example"):
            response = client.post("/sdapi/v1/txt2img", json={"steps": 1}, headers={"Origin": origin})
            assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
        refused = client.post("/sdapi/v1/txt2img", json={"steps": 1}, headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    with running(create_app(FakePipeline(), outputs=tmp_path)) as url, httpx.Client(base_url=url) as client:
        refused = client.post("/sdapi/v1/txt2img", json={"steps": 1}, headers={"Origin": "http://app.example"})
        assert refused.status_code == 403   # off by default


def test_loopback_server_refuses_other_host_names(tmp_path):
    with running(create_app(FakePipeline(), outputs=tmp_path, allowed_hosts=LOOPBACK_HOSTS)) as url:
        with httpx.Client(base_url=url) as client:
            assert client.get("/sdapi/v1/samplers").status_code == 200
            response = client.get("/sdapi/v1/samplers", headers={"Host": "rebind.evil.example"})
            assert response.status_code == 403 and "--listen" in response.json()["detail"]


@pytest.mark.parametrize("bind", ["127.0.0.2", "::1", "localhost", "192.168.7.7"])
def test_host_allow_list_covers_every_loopback_and_the_bind_address(tmp_path, bind):
    app = create_app(FakePipeline(), outputs=tmp_path, allowed_hosts=allowed_hosts_for(bind))
    with running(app) as url, httpx.Client(base_url=url) as client:
        for host in ("127.0.0.1", "127.0.0.2:7860", "127.255.0.9", "[::1]:80", "localhost:1", "[::ffff:127.0.0.3]",
                     f"[{bind}]" if ":" in bind else bind):
            assert client.get("/sdapi/v1/samplers", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "127.0.0.1.evil.example", "192.168.7.8", "0.0.0.0", "[::2]"):
            response = client.post("/sdapi/v1/interrupt", headers={"Host": host, "Origin": f"http://{host}"})
            assert response.status_code == 403 and "not allowed" in response.json()["detail"], host
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("::") is None


def test_serve_binds_loopback_and_guards_host(monkeypatch, tmp_path, capsys):
    import argparse

    import nanodiffusion.pipeline
    from nanodiffusion.server.app import serve

    served = {}
    monkeypatch.setattr(nanodiffusion.pipeline.Pipeline, "load", classmethod(lambda cls, path=None, **kwargs: FakePipeline()))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    args = argparse.Namespace(model=None, host="127.0.0.1", port=7860, listen=False, api_auth="u:p",
                              outputs=str(tmp_path / "outputs"), lora_dir=None, controlnet=None)
    serve(args)
    assert (served["host"], served["port"]) == ("127.0.0.1", 7860) and (tmp_path / "outputs").is_dir()
    with running(served["app"]) as url, httpx.Client(base_url=url, auth=("u", "p")) as client:
        assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "fake-model"
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 403
    capsys.readouterr()
    serve(argparse.Namespace(**{**vars(args), "listen": True, "api_auth": None}))
    assert served["host"] == "0.0.0.0"
    banner = capsys.readouterr()
    assert "http://0.0.0.0:7860" in banner.out and "WARNING" in banner.err and "--api-auth" in banner.err
    serve(argparse.Namespace(**{**vars(args), "host": "127.0.0.2", "api_auth": None}))
    assert "http://127.0.0.2:7860" in capsys.readouterr().out
    with running(served["app"]) as url, httpx.Client(base_url=url) as client:
        refused = client.post("/sdapi/v1/interrupt", headers={"Host": "evil.example", "Origin": "http://evil.example"})
        assert refused.status_code == 403 and client.get("/", headers={"Host": "127.0.0.2:7860"}).status_code == 200
    with pytest.raises(NanoDiffusionError, match="USER:PASS"):
        serve(argparse.Namespace(**{**vars(args), "api_auth": "nopassword"}))


def test_loras_listed_from_the_lora_folder(fake, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "style.safetensors",
              metadata={"ss_network_dim": "1"})
    (tmp_path / "notes.txt").write_text("not a lora")
    pipe = FakePipeline()
    pipe.lora_dir = tmp_path
    with running(create_app(pipe, outputs=tmp_path / "out")) as url, httpx.Client(base_url=url) as client:
        listed = client.get("/sdapi/v1/loras").json()
        assert [(item["name"], item["metadata"]["ss_network_dim"]) for item in listed] == [("style", "1")]
        assert client.get("/api/config").json()["loras"] == ["style"]


def test_controlnet_unit_reaches_the_pipeline(tmp_path):
    control = Image.new("RGB", (64, 64), (255, 255, 255))
    unit = {"alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "image": b64_png(control), "weight": 0.6}]}}}
    plain = Recording(FakePipeline())
    with running(create_app(plain, outputs=tmp_path / "a")) as url, httpx.Client(base_url=url) as client:
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **unit})
        assert refused.status_code == 422 and "--controlnet" in refused.json()["detail"]
    steered = FakePipeline()
    steered.controlnet = object()
    recorded = Recording(steered)
    with running(create_app(recorded, outputs=tmp_path / "b")) as url, httpx.Client(base_url=url) as client:
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **unit}).status_code == 200
        assert client.get("/api/config").json()["controlnet"] is True
    call = recorded.calls[-1]
    assert call["control_scale"] == 0.6 and call["control_image"].size == (64, 64)


def post_raw(client: httpx.Client, path: str, raw: str) -> httpx.Response:
    """POST a JSON text as is (NaN, Infinity and "\\ud800" escapes included)."""
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def test_long_lora_tag_prompt_is_refused_before_parsing(server):
    response = server.post("/sdapi/v1/txt2img", json={"prompt": "<lora:a" * 12_000, "steps": 1})
    assert response.status_code == 422 and "prompt is 84000 characters" in response.json()["detail"]
    response = server.post("/sdapi/v1/txt2img", json={"negative_prompt": "x " * 15_000, "steps": 1})
    assert response.status_code == 422 and response.json()["detail"].startswith("negative prompt is 30000 characters")


def test_image_work_runs_off_the_event_loop(server, monkeypatch):
    import asyncio

    from nanodiffusion.server import jobs

    seen = []

    def record(image, mask, request):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker thread")
        return image, mask

    monkeypatch.setattr(jobs, "prepare_inpaint", record)
    image = b64_png(Image.new("RGB", (64, 64)))
    body = {"init_images": [image], "mask": image, "steps": 1}
    assert server.post("/sdapi/v1/img2img", json=body).status_code == 200
    assert server.post("/api/jobs", json=body).status_code == 200
    assert seen == ["worker thread", "worker thread"]


def test_options_are_validated_like_generation_fields(server, fake):
    for raw in ('{"CLIP_stop_at_last_layers": 99}', '{"CLIP_stop_at_last_layers": Infinity}',
                '{"CLIP_stop_at_last_layers": NaN}', '{"show_progress_every_n_steps": 0}',
                '{"live_previews_enable": [1]}'):
        response = post_raw(server, "/sdapi/v1/options", raw)
        assert response.status_code == 422, raw
        assert isinstance(response.json()["detail"], str) and raw[2:14] in response.json()["detail"]
    assert server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    assert server.post("/sdapi/v1/txt2img", json={"steps": 1}).status_code == 200 and fake.calls[-1]["clip_skip"] == 1


def test_clip_skip_beyond_the_models_layers_is_refused(tmp_path):
    class Encoder:
        config = type("Config", (), {"num_hidden_layers": 3})

    pipe = FakePipeline()
    pipe.text_encoder = Encoder()
    with running(create_app(pipe, outputs=tmp_path)) as url, httpx.Client(base_url=url) as client:
        response = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 4})
        assert response.status_code == 422 and "use 1 to 3" in response.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
        response = client.post("/sdapi/v1/txt2img", json={"override_settings": {"CLIP_stop_at_last_layers": 5}})
        assert response.status_code == 422 and "use 1 to 3" in response.json()["detail"]


@pytest.mark.parametrize("raw, where", [
    ('{"cfg_scale": NaN}', "cfg_scale"), ('{"cfg_scale": Infinity}', "cfg_scale"),
    ('{"eta": NaN, "sampler_name": "DPM++ SDE"}', "eta"), ('{"eta": 1e308}', "eta"),
    ('{"hr_scale": -Infinity}', "hr_scale"), ('{"script_args": [1, [NaN]]}', "script_args[1][0]"),
    ('{"override_settings": {"CLIP_stop_at_last_layers": Infinity}}', "CLIP_stop_at_last_layers"),
    ('{"prompt": "a <lora:style:nan>"}', "LoRA weight nan"), ('{"prompt": "a <lora:style:1e308>"}', "LoRA weight"),
    ('{"prompt": "a <lora:style:inf>"}', "LoRA weight inf"),
    ('{"prompt": "(a:1.2.3)"}', "emphasis weight '1.2.3' is not a number"),
    ('{"prompt": "(a:99999)"}', "emphasis weight 99999"),
    ('{"prompt": "a \\ud800 b"}', "prompt holds an unpaired surrogate"),
    ('{"negative_prompt": "\\udfff"}', "negative_prompt holds an unpaired surrogate"),
    ('{"styles": ["\\ud800"]}', "styles[0]"), ('{"x\\ud800": 1}', "a key in the body"),
    ('{"override_settings": {"CLIP_stop_at_last_layers": "x"}}', "override_settings.CLIP_stop_at_last_layers"),
    ('{"override_settings": {"show_progress_every_n_steps": [1]}}', "show_progress_every_n_steps"),
    ('{"override_settings": "fast"}', "override_settings"),
    ('{"alwayson_scripts": {"ControlNet": [1]}}', "alwayson_scripts.controlnet must look like"),
    ('{"alwayson_scripts": {"controlnet": {"args": "x"}}}', "alwayson_scripts.controlnet must look like"),
    ('{"alwayson_scripts": []}', "alwayson_scripts"),
])
def test_bad_values_anywhere_are_one_line_422(server, raw, where):
    body = json.loads(raw.replace("NaN", "0").replace("Infinity", "0").replace("\\ud800", "").replace("\\udfff", ""))
    raw = raw[:-1] + (', "steps": 1}' if body else '"steps": 1}')
    response = post_raw(server, "/sdapi/v1/txt2img", raw)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and where in detail


def test_bad_controlnet_units_and_mask_blur_are_422(tmp_path):
    steered = FakePipeline()
    steered.controlnet = object()
    image = b64_png(Image.new("RGB", (64, 64)))
    with running(create_app(steered, outputs=tmp_path)) as url, httpx.Client(base_url=url) as client:
        for weight, message in (("heavy", "must be a number"), (5, "out of range"), (True, "must be a number")):
            unit = {"controlnet": {"args": [{"image": image, "weight": weight}]}}
            response = client.post("/sdapi/v1/txt2img", json={"steps": 1, "alwayson_scripts": unit})
            assert response.status_code == 422 and message in response.json()["detail"], weight
        for blur in (1e20, -1, 65):
            response = client.post("/sdapi/v1/img2img", json={"init_images": [image], "mask": image, "mask_blur": blur})
            assert response.status_code == 422 and response.json()["detail"].startswith("mask_blur"), blur


def test_loras_listing_survives_pt_ckpt_and_broken_files(tmp_path):
    from safetensors.torch import save_file

    loras = tmp_path / "loras"
    (loras / "sub").mkdir(parents=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, loras / "good.safetensors",
              metadata={"ss_network_dim": "1"})
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, loras / "old.pt")
    (loras / "sub" / "older.ckpt").write_bytes(b"not even a zip")
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (loras / "empty.safetensors").write_bytes(b"")
    pipe = FakePipeline()
    pipe.lora_dir = loras
    with running(create_app(pipe, outputs=tmp_path / "out")) as url, httpx.Client(base_url=url) as client:
        response = client.get("/sdapi/v1/loras")
        assert response.status_code == 200, response.text
        listed = {item["name"]: (item["path"], item["metadata"]) for item in response.json()}
        assert listed == {"broken": ("broken.safetensors", {}), "empty": ("empty.safetensors", {}),
                          "good": ("good.safetensors", {"ss_network_dim": "1"}), "old": ("old.pt", {}),
                          "older": ("sub/older.ckpt", {})}
        assert str(tmp_path) not in response.text


def test_error_messages_name_no_server_folder(tmp_path):
    loras = tmp_path / "secret-place" / "loras"
    loras.mkdir(parents=True)

    class Failing(FakePipeline):
        def __call__(self, prompt, negative_prompt="", **kwargs):
            if "crash" in prompt:
                raise RuntimeError(f"cannot open {tmp_path}/secret-place/model.bin")
            raise NanoDiffusionError(f"{loras / 'x.safetensors'}: not a LoRA file")

    pipe = Failing()
    pipe.lora_dir = loras
    with running(create_app(pipe, outputs=tmp_path / "out")) as url, httpx.Client(base_url=url) as client:
        missing = client.post("/sdapi/v1/txt2img", json={"prompt": "<lora:nope>", "steps": 1})
        assert missing.status_code == 422 and "no LoRA named 'nope' in the LoRA folder" in missing.json()["detail"]
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": "fine", "steps": 1})
        assert refused.status_code == 400
        assert refused.json()["detail"] == "the LoRA folder/x.safetensors: not a LoRA file"
        crashed = client.post("/sdapi/v1/txt2img", json={"prompt": "crash", "steps": 1})
        assert crashed.status_code == 500 and crashed.json()["detail"].endswith("cannot open model.bin")
        for response in (missing, refused, crashed):
            assert "secret-place" not in response.text


def test_no_redoc_and_no_framing(server):
    assert server.get("/redoc").status_code == 404
    for response in (server.get("/"), server.get("/sdapi/v1/samplers"), server.get("/docs"),
                     server.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"})):
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'"


def test_tiny_init_image_message_names_the_image(server):
    tiny = b64_png(Image.new("RGB", (1, 1)))
    response = server.post("/sdapi/v1/img2img", json={"init_images": [tiny], "steps": 1})
    assert response.status_code == 422 and response.json()["detail"].startswith("init_images[0] is 1x1 pixels")
    scaled = server.post("/sdapi/v1/img2img", json={"init_images": [tiny], "steps": 1, "width": 64, "height": 64})
    assert scaled.status_code == 200


def test_job_of_a_client_that_hangs_up_is_cancelled(slow):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(str(slow.base_url) + "/sdapi/v1/txt2img", json={"steps": 150, "n_iter": 4}, timeout=0.5)
    wait_for(lambda: slow.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0, timeout=3)
    assert len(slow.pipe.calls) >= 1 and slow.pipe.calls[-1]["steps"] == 150


def test_stalled_request_body_times_out(tmp_path):
    with running(create_app(FakePipeline(), outputs=tmp_path, body_timeout=0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"pro")
            answer = b""
            while chunk := sock.recv(1000):   # the headers and the body may come in separate segments
                answer += chunk
                if b"stalled" in answer:
                    break
        assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer


@pytest.mark.parametrize("name, scheduler, expected", [
    ("DDIM", "normal", ("ddim", "default")),                  # SillyTavern's defaults
    ("DPM++ 2M", None, ("dpmpp_2m", "karras")),               # Automatic: the sampler's own schedule
    ("DPM++ 2M SDE", "Automatic", ("dpmpp_2m_sde", "exponential")),
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),        # old combined names
    ("LMS Karras", "exponential", ("lms", "karras")),         # the name's scheduler wins, as in the web UI
    ("k_euler_a", None, ("euler_a", "default")),
    ("euler_a", "default", ("euler_a", "default")),           # our ids and spacing names (the CLI's)
    ("Euler", "Polyexponential", ("euler", "exponential")),   # rho 1: the same spacing
    (None, None, ("euler", "default")),                       # the API's default sampler_index
])
def test_sampler_names_resolve_like_the_web_ui(name, scheduler, expected):
    from nanodiffusion.sampler_names import resolve_sampler

    assert resolve_sampler(name, scheduler) == (*expected, [])


def test_unimplemented_sampler_names_fall_back_with_a_warning():
    from nanodiffusion.sampler_names import WEB_SCHEDULERS, resolve_sampler

    assert resolve_sampler("DPM++ 3M SDE", "beta") == ("dpmpp_2m", "karras", [
        "sampler 'DPM++ 3M SDE' is not implemented here: used DPM++ 2M",
        "scheduler 'beta' is not implemented here: used Karras, the Automatic choice for DPM++ 2M"])
    assert resolve_sampler("Heun", "Nope")[1:] == ("default", [
        "scheduler 'Nope' is unknown: used Uniform, the Automatic choice for Heun"])
    assert len(WEB_SCHEDULERS) == 12 and [s for s in WEB_SCHEDULERS if s.ours is None] != []


def test_errors_have_the_web_ui_shape(tmp_path):
    app = create_app(FakePipeline(), outputs=tmp_path)

    @app.get("/sdapi/v1/boom")
    def boom() -> None:
        raise ZeroDivisionError("secret detail")

    with running(app) as url, httpx.Client(base_url=url) as client:
        missing = client.get("/sdapi/v1/no-such-route")
        assert missing.status_code == 404 and missing.json() == {
            "error": "HTTPException", "detail": "Not Found", "body": "", "errors": "404: Not Found"}
        crashed = client.get("/sdapi/v1/boom")
        assert crashed.status_code == 500 and crashed.json()["error"] == "ZeroDivisionError"
        assert "secret" not in crashed.text
        invalid = client.post("/sdapi/v1/txt2img", json={"steps": "many"})
        assert invalid.status_code == 422 and set(invalid.json()) == {"error", "detail", "body", "errors"}


def test_resize_modes_and_lasting_overrides(server, fake):
    wide = Image.new("RGB", (128, 64), (0, 0, 255))
    wide.paste((255, 0, 0), (32, 0, 96, 64))   # red in the middle half
    body = {"init_images": [b64_png(wide)], "width": 64, "height": 64, "steps": 2, "resize_mode": 1}
    assert server.post("/sdapi/v1/img2img", json=body).status_code == 200
    assert fake.calls[-1]["init_image"].size == (64, 64) and fake.calls[-1]["init_image"].getpixel((1, 32))[0] > 200
    refused = server.post("/sdapi/v1/img2img", json={**body, "resize_mode": 2})
    assert refused.status_code == 422 and "resize_mode" in refused.json()["detail"]
    server.post("/sdapi/v1/txt2img", json={"steps": 2, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1   # restored afterwards
    server.post("/sdapi/v1/txt2img", json={"steps": 2, "override_settings": {"CLIP_stop_at_last_layers": 2},
                                           "override_settings_restore_afterwards": False})
    assert server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2   # kept, as asked
    server.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def test_mask_blur_x_and_y_blur_the_mask_like_the_web_ui():
    """modules/processing.py (StableDiffusionProcessingImg2Img.init): cv2.GaussianBlur(mask, (k, 1), mask_blur_x)
    then (1, k) with mask_blur_y, k = 2 * int(2.5 * blur + 0.5) + 1, mirrored edges, uint8 after each pass; mask_blur
    (when given) sets both. scipy's gaussian_filter1d with truncate=2.5 and mode "mirror" is that same kernel."""
    from oracles import require

    from nanodiffusion.server.jobs import blur_mask, prepare_inpaint
    from nanodiffusion.server.schema import Img2ImgRequest

    gaussian = require("scipy.ndimage").gaussian_filter1d
    mask = Image.new("L", (48, 40))
    mask.paste(255, (12, 10, 30, 26))
    mask.putpixel((0, 0), 255)

    def reference(pixels, sigma, axis):
        blurred = gaussian(pixels.astype(np.float64), sigma, axis=axis, truncate=2.5, mode="mirror")
        return np.rint(blurred).clip(0, 255).astype(np.uint8)

    ours = np.asarray(blur_mask(mask, 6, 2)).astype(int)
    theirs = reference(reference(np.asarray(mask), 6, 1), 2, 0).astype(int)
    assert np.abs(ours - theirs).max() <= 1 and ours[18, 8] > 0 and ours[4, 20] == 0   # wide across, narrow down
    assert np.array_equal(np.asarray(blur_mask(mask, 0, 0)), np.asarray(mask))
    image = Image.new("RGB", mask.size)

    def prepared(**fields):
        body = Img2ImgRequest(init_images=["x"], mask="x", inpainting_fill=1, **fields)
        return np.asarray(prepare_inpaint(image, mask, body)[1])

    assert np.array_equal(prepared(mask_blur_x=6, mask_blur_y=2), np.asarray(blur_mask(mask, 6, 2)))
    assert np.array_equal(prepared(), np.asarray(blur_mask(mask, 4, 4)))   # the web UI's defaults: 4 and 4
    assert np.array_equal(prepared(mask_blur=3, mask_blur_x=9), np.asarray(blur_mask(mask, 3, 3)))
    assert np.array_equal(prepared(mask_blur=0), np.asarray(mask))


def test_mask_blur_x_reaches_the_pipeline(server, fake):
    init, mask = Image.new("RGB", (64, 64), "red"), Image.new("L", (64, 64))
    mask.paste(255, (24, 24, 40, 40))
    fake.calls.clear()
    body = {"init_images": [b64_png(init)], "mask": b64_png(mask), "mask_blur_x": 8, "mask_blur_y": 0, "steps": 2,
            "inpainting_fill": 1}
    assert server.post("/sdapi/v1/img2img", json=body).status_code == 200
    sent = np.asarray(fake.calls[-1]["mask"])
    assert sent[32, 18] > 0 and sent[18, 32] == 0   # blurred across the edge, not down it


def test_interrupted_images_carry_the_parameters_of_finished_ones(tmp_path):
    """A Pipeline's partial image gets the very text its finished image would have had (tiny random model)."""
    from tiny import tiny_pipeline

    from nanodiffusion.server.queue import Job, Worker

    pipe = tiny_pipeline()
    call = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "sampler": "DPM++ 2M",
            "schedule": "karras", "cfg": 4.5, "seed": 11, "width": 32, "height": 32, "batch": 2, "init_image": None,
            "strength": 0.75, "mask": None, "eta": None, "clip_skip": 1, "control_image": None, "control_scale": 1.0}
    finished = pipe(**call)
    job = Job(call)
    job.interrupt = True
    job.latest_x0 = torch.zeros(2, pipe.vae.config.latent_channels, 32 // pipe.vae_scale, 32 // pipe.vae_scale)
    partial = Worker(pipe, tmp_path).partial(job, call)
    assert [image.size for image in partial] == [(32, 32)] * 2
    assert [image.info["parameters"] for image in partial] == [image.info["parameters"] for image in finished]
    assert "Seed: 12" in partial[1].info["parameters"]
