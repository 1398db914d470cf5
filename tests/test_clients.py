"""Real clients of the popular web UI's API, replayed against `nanodiff serve` with the built-in model.

Each test sends the requests one program sends, in its order and with its bodies, written from that program's
source (cited in the test), and reads the answers the way it reads them. Sizes and steps are the small values a
user of each client can set, so the built-in model answers in a fraction of a second.
"""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from serving import running
from test_server import FakePipeline

from nanodiffusion.loading import BUILTIN
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.server.app import create_app

STYLES = 'name,prompt,negative_prompt\nCinematic,"cinematic still of {prompt}, film grain","cartoon"\nPlain,,blurry\n'


# ---- the web UI's parse_generation_parameters, reimplemented from its documented behaviour ----
# (modules/infotext_utils.py: the last line holds "Key: value" pairs, values with "," ":" or newlines are
# JSON-quoted, "Size: WxH" becomes Size-1 / Size-2, "Negative prompt:" starts the negative prompt)
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def webui_parse(text: str) -> dict[str, str]:
    """The web UI's parser, core behaviour (no defaults, no styles extraction)."""
    result: dict[str, str] = {}
    prompt = negative = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = RE_IMAGESIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = value
    result["Prompt"], result["Negative prompt"] = prompt, negative
    return result


def decode(b64: str) -> Image.Image:
    """A base64 image as clients decode it (webuiapi: Image.open(BytesIO(b64decode(i))))."""
    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1])))


def data_url(image: Image.Image) -> str:
    """webuiapi's b64_img: a PNG data URL keeping the image's text items (its raw_b64_img)."""
    metadata = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            metadata.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def load(path=None) -> Pipeline:
    """Pipeline.load, with a model name holding ", " and ": " to exercise the infotext quoting."""
    pipeline = Pipeline.load(path)
    pipeline.name = f"tiny, v1: {pipeline.name}"
    return pipeline


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """A real server: the built-in model, a models folder with a second checkpoint, a styles file."""
    root = tmp_path_factory.mktemp("clients")
    models = root / "models"
    models.mkdir()
    (models / "tiny-copy").symlink_to(BUILTIN, target_is_directory=True)
    (root / "styles.csv").write_text(STYLES)
    app = create_app(load(), outputs=root / "outputs", model_path=BUILTIN, models_dir=models, loader=load,
                     styles_file=root / "styles.csv")
    with running(app) as base:
        yield base


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60) as http:
        yield http


def test_sillytavern_sequence(client):
    """SillyTavern's Stable Diffusion extension: src/endpoints/stable-diffusion.js (server side, forwards the body
    it gets) and public/scripts/extensions/stable-diffusion/index.js generateAutoImage (the body; defaults
    sampler "DDIM", scheduler "normal", hr_upscaler "Latent")."""
    assert client.get("/sdapi/v1/options").status_code == 200                      # /ping
    upscalers = client.get("/sdapi/v1/upscalers").json()                           # /upscalers, both at once
    latent = client.get("/sdapi/v1/latent-upscale-modes").json()
    names = [x["name"] for x in upscalers]
    names[1:1] = [x["name"] for x in latent]
    assert names[0] == "None" and "Lanczos" in names
    assert client.get("/sdapi/v1/sd-vae").json() == []                            # /vaes: sd-vae, or Forge's
    assert client.get("/sdapi/v1/sd-modules").status_code == 404                   # sd-modules (allSettled)
    assert "DDIM" in [x["name"] for x in client.get("/sdapi/v1/samplers").json()]
    assert "normal" in [x["name"] for x in client.get("/sdapi/v1/schedulers").json()]   # runs as Uniform
    models = [{"value": x["title"], "text": x["title"]} for x in client.get("/sdapi/v1/sd-models").json()]
    current = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]        # /get-model
    assert current in [m["value"] for m in models]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": current}).status_code == 200  # /set-model
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0     # "done loading"
    assert "forge_preset" not in client.get("/sdapi/v1/options").json()            # /generate: not Forge
    body = {
        "url": "http://localhost:7860", "auth": "", "prompt": "a red circle", "negative_prompt": "lowres, blurry",
        "sampler_name": "DDIM", "scheduler": "normal", "steps": 2, "cfg_scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2.0,
        "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert decode(response.json()["images"][0]).size == (64, 64)
    assert info["sampler_name"] == "DDIM" and info["scheduler"] == "Uniform" and info["warnings"] == []


def test_webuiapi_sequence(client):
    """The webuiapi Python client: webuiapi/webuiapi.py (mix1009/sdwebuiapi): WebUIApi() checks extensions
    through /scripts, then txt2img / img2img / extras / png_info / interrogate / utilities, with its payloads and
    defaults (sampler "Euler a", eta 1.0, s_tmax 0, seed_resize 0, inpaint_full_res True)."""
    scripts = client.get("/sdapi/v1/scripts").json()                               # check_controlnet
    assert "controlnet m2m" not in scripts["txt2img"] and "adetailer" not in scripts["txt2img"]

    def txt2img(**overrides) -> httpx.Response:
        payload = {
            "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
            "hr_resize_y": 0, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "prompt": "a blue square", "styles": [], "seed": 7, "subseed": -1, "subseed_strength": 0.0,
            "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 2,
            "cfg_scale": 7.0, "width": 64, "height": 64, "restore_faces": False, "tiling": False,
            "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0,
            "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
            "override_settings_restore_afterwards": True, "sampler_name": "Euler a", "sampler_index": "Euler a",
            "script_name": None, "script_args": [], "send_images": True, "save_images": False,
            "alwayson_scripts": {}, **overrides}
        return client.post("/sdapi/v1/txt2img", json=payload)

    result = txt2img()
    assert result.status_code == 200, result.text
    image = decode(result.json()["images"][0])
    assert json.loads(result.json()["info"])["all_seeds"] == [7] and image.size == (64, 64)
    hires = txt2img(enable_hr=True)                                 # webuiapi's hr defaults: Latent, x2
    assert hires.status_code == 200, hires.text
    assert decode(hires.json()["images"][0]).size == (128, 128)
    varied = txt2img(subseed=3, subseed_strength=0.3, tiling=True)
    assert varied.status_code == 200 and json.loads(varied.json()["info"])["all_subseeds"] == [3]
    refused = txt2img(enable_hr=True, hr_upscaler="R-ESRGAN 4x+")
    assert refused.status_code == 422 and "Lanczos" in refused.json()["detail"]
    refused = txt2img(enable_hr=True, hr_sampler_name="Euler")
    assert refused.status_code == 422 and refused.json()["detail"].startswith("hr_sampler_name='Euler' asks for")
    assert txt2img(hr_sampler_name="Euler").status_code == 200     # ignored while hires fix is off, as there

    def img2img(**overrides) -> httpx.Response:
        payload = {
            "init_images": [data_url(image)], "resize_mode": 0, "denoising_strength": 0.75, "mask_blur": 4,
            "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
            "inpainting_mask_invert": 0, "initial_noise_multiplier": 1, "prompt": "a blue square", "styles": [],
            "seed": 7, "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
            "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0, "image_cfg_scale": 1.5, "width": 64,
            "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
            "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
            "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
            "sampler_name": "Euler a", "sampler_index": "Euler a", "include_init_images": False,
            "script_name": None, "script_args": [], "send_images": True, "save_images": False,
            "alwayson_scripts": {}, **overrides}
        return client.post("/sdapi/v1/img2img", json=payload)

    assert img2img().status_code == 200
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    only_masked = img2img(mask=data_url(mask))      # "only masked" (inpaint_full_res) is webuiapi's default
    assert only_masked.status_code == 200, only_masked.text
    inpainted = np.asarray(decode(only_masked.json()["images"][0])).astype(int)
    assert np.abs(inpainted[:8, :8] - np.asarray(image.convert("RGB"))[:8, :8]).max() <= 2   # kept outside
    assert img2img(mask=data_url(mask), inpaint_full_res=False).status_code == 200

    extras = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
              "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 512, "upscaling_resize_h": 512,
              "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None",
              "extras_upscaler_2_visibility": 0, "upscale_first": False}
    single = client.post("/sdapi/v1/extra-single-image", json={**extras, "image": data_url(image)}).json()
    assert decode(single["image"]).size == (128, 128) and "Lanczos" in single["html_info"]
    fitted = client.post("/sdapi/v1/extra-single-image", json={
        **extras, "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 80, "image": data_url(image)})
    assert decode(fitted.json()["image"]).size == (96, 80)
    batch = client.post("/sdapi/v1/extra-batch-images", json={**extras, "upscaler_1": "Nearest", "imageList": [
        {"data": data_url(image), "name": "image00001"}, {"data": data_url(image), "name": "image00002"}]}).json()
    assert [decode(b).size for b in batch["images"]] == [(128, 128)] * 2
    faces = client.post("/sdapi/v1/extra-single-image", json={**extras, "gfpgan_visibility": 1,
                                                              "image": data_url(image)})
    assert faces.status_code == 422 and "gfpgan_visibility" in faces.json()["detail"]

    info = client.post("/sdapi/v1/png-info", json={"image": data_url(image)}).json()   # png_info
    assert info["info"] == image.info["parameters"] and info["parameters"]["Seed"] == "7"
    answer = client.post("/sdapi/v1/interrogate", json={"image": data_url(image), "model": "clip"})
    assert answer.status_code == 501 and set(answer.json()) == {"error", "detail", "body", "errors"}

    assert client.post("/sdapi/v1/interrupt").json() == {} and client.post("/sdapi/v1/skip").json() is None
    for path in ("options", "cmd-flags", "progress", "samplers", "sd-vae", "upscalers", "latent-upscale-modes",
                 "loras", "sd-models", "hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles",
                 "scripts", "embeddings", "memory"):
        assert client.get(f"/sdapi/v1/{path}").status_code == 200, path
    assert client.post("/sdapi/v1/refresh-checkpoints").json() is None
    assert isinstance(client.get("/controlnet/version").json()["version"], int)
    assert client.get("/controlnet/model_list").json()["model_list"] == []          # no --controlnet here
    assert client.get("/controlnet/module_list").json()["module_list"] == ["none"]
    titles = sorted(x["title"] for x in client.get("/sdapi/v1/sd-models").json())  # util_get_model_names
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] in titles  # util_get_current_model


def test_open_webui_sequence(client):
    """Open WebUI's image router: backend/open_webui/routers/images.py (open-webui/open-webui):
    get_image_model, get_models, set_image_model (posts the whole options dict back), verify_url, then
    image_generations for AUTOMATIC1111 (prompt, batch_size = n, size, steps, negative_prompt)."""
    options = client.get("/sdapi/v1/options").json()
    model = options["sd_model_checkpoint"]
    listed = [{"id": m["title"], "name": m["model_name"]} for m in client.get("/sdapi/v1/sd-models").json()]
    assert model in [m["id"] for m in listed]
    other = next(m["id"] for m in listed if m["id"] != model)
    options["sd_model_checkpoint"] = other
    client.post("/sdapi/v1/options", json=options).raise_for_status()
    client.get("/sdapi/v1/options").raise_for_status()
    data = {"prompt": "a green triangle", "batch_size": 2, "width": 64, "height": 64, "steps": 2,
            "negative_prompt": "blurry"}
    res = client.post("/sdapi/v1/txt2img", json=data).json()
    assert len(res["images"]) == 2 and all(decode(image).size == (64, 64) for image in res["images"])
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert any(t.startswith("tiny-copy [") for t in titles)        # loaded on use, hashed
    options["sd_model_checkpoint"] = model                          # switch back for the other tests
    client.post("/sdapi/v1/options", json=options).raise_for_status()
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert refused.status_code == 422 and "tiny-copy" in refused.json()["detail"]


def test_aiyabot_sequence(client):
    """The aiyabot Discord bot (Kilvoctu/aiyabot): core/settings.py startup_check / authenticate_user /
    populate_global_vars at start-up, then core/stablecog.py dream() (its txt2img payload, then png-info for
    every image)."""
    response = client.get("/sdapi/v1/cmd-flags")
    assert response.status_code not in (401, 404)                  # "API is unreachable" on 404
    client.post("/login")                                           # status ignored by the bot
    for sampler in client.get("/sdapi/v1/samplers").json():
        assert sampler["name"]
    styles = {"None": ""} | {s["name"]: (s["prompt"], s["negative_prompt"])
                             for s in client.get("/sdapi/v1/prompt-styles").json()}
    assert "Cinematic" in styles
    facefix = [s["name"] for s in client.get("/sdapi/v1/face-restorers").json()]
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert facefix == [] and embeddings["loaded"] == {} and embeddings["skipped"] == {}
    assert [s["name"] for s in client.get("/sdapi/v1/hypernetworks").json()] == []
    assert "Lanczos" in [s["name"] for s in client.get("/sdapi/v1/upscalers").json()]
    for model in client.get("/sdapi/v1/sd-models").json():
        assert model["filename"] and model["model_name"] and model["title"]
    config = client.get("/config").json()                           # the Gradio config: absent, but JSON
    assert "components" not in config
    payload = {"prompt": "a yellow star", "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
               "cfg_scale": "7.0", "sampler_index": "Euler a", "seed": 2**40, "seed_resize_from_h": 0,
               "seed_resize_from_w": 0, "denoising_strength": None, "n_iter": 2, "styles": ["None"],
               "override_settings": {"CLIP_stop_at_last_layers": 1}}
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [2**40, 2**40 + 1]                 # seeds past 2**32 are kept, not randomised
    for image_base64 in response.json()["images"]:
        png = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image_base64}).json()
        assert png.get("info") and webui_parse(png["info"])["Seed"] in (str(2**40), str(2**40 + 1))


def test_librechat_request(tmp_path):
    """LibreChat's Stable Diffusion tool: api/app/clients/tools/structured/StableDiffusion.js (danny-avila/LibreChat)
    posts a fixed payload (1024x1024, 22 steps) and reads images[0] and info's seed, size and infotexts[0]. The
    fake pipeline of test_server stands in for the model: 22 steps at 1024 px are minutes on a CPU."""
    payload = {"prompt": "photo of a man in black clothes", "negative_prompt": "cartoon, low quality",
               "cfg_scale": 4.5, "steps": 22, "width": 1024, "height": 1024}
    fake = FakePipeline()
    fake.preview = lambda latents: [Image.new("RGB", (8, 8))]   # no 1024 px preview PNG at every step
    with running(create_app(fake, outputs=tmp_path)) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200
    image = response.json()["images"][0]
    info = json.loads(response.json()["info"])
    assert decode(image).size == (1024, 1024) and (info["width"], info["height"]) == (1024, 1024)
    assert isinstance(info["seed"], int) and info["infotexts"][0].split("\n").pop().startswith("Steps: 22")


def test_png_text_parses_with_the_web_ui_parser(client):
    """Every PNG we write reads back with the web UI's parse_generation_parameters, quoted values included
    (the model name here holds ", " and ": ")."""
    body = {"prompt": "a red circle, left: of a blue square", "negative_prompt": "blurry\nnoisy",
            "sampler_name": "DPM++ 2M", "steps": 2, "width": 64, "height": 64, "seed": 11}
    response = client.post("/sdapi/v1/txt2img", json=body).json()
    text = decode(response["images"][0]).info["parameters"]
    parsed = webui_parse(text)
    assert parsed["Model"] == "tiny, v1: builtin" and parsed["Seed"] == "11"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64") and parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Prompt"] == body["prompt"] and parsed["Negative prompt"] == body["negative_prompt"]
    served = client.post("/sdapi/v1/png-info", json={"image": response["images"][0]}).json()
    assert {k: served["parameters"][k] for k in parsed} == parsed   # our parser agrees with theirs
    assert served["parameters"]["Schedule type"] == parsed.get("Schedule type", "Automatic")


def test_styles_seeds_fields_and_task_progress(client):
    """Styles from the styles file, the web UI's error shape, and the page's /internal/progress by task id."""
    body = {"prompt": "a cat", "styles": ["Cinematic", "Plain"], "steps": 2, "width": 64, "height": 64,
            "force_task_id": "task(abc123)"}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["prompt"] == "cinematic still of a cat, film grain"
    assert info["negative_prompt"] == "cartoon, blurry" and info["styles"] == ["Cinematic", "Plain"]
    done = client.post("/internal/progress", json={"id_task": "task(abc123)", "id_live_preview": -1}).json()
    assert done["completed"] is True and done["active"] is False
    unknown = client.post("/internal/progress", json={"id_task": "task(nope)"}).json()
    assert (unknown["completed"], unknown["queued"], unknown["textinfo"]) == (False, False, "Waiting...")
    refused = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["Nope"]})
    assert refused.status_code == 422 and "Cinematic" in refused.json()["detail"]
    invalid = client.post("/sdapi/v1/txt2img", json={"steps": "many"})
    assert invalid.json()["error"] == "RequestValidationError" and invalid.json()["detail"].startswith("steps")
    assert client.post("/sdapi/v1/txt2img", json={"seed": -5, "steps": 2}).status_code == 422
    fallback = client.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM2 a", "scheduler": "Align Your Steps",
                                                      "steps": 2, "width": 64, "height": 64})
    warnings = json.loads(fallback.json()["info"])["warnings"]
    assert warnings == ["sampler 'DPM2 a' is not implemented here: used DPM++ 2M",
                        "scheduler 'Align Your Steps' is not implemented here: used Karras, the Automatic choice "
                        "for DPM++ 2M"]
