"""A bounded load test: 100 concurrent mixed requests against the real server with the built-in model.

Every request is answered 200 or 429 (the queue holds at most `MAX_QUEUE` waiting jobs), the server answers
/progress all along, and memory stays flat from one burst to the next.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest
from PIL import Image
from serving import b64_png, running

from nanodiffusion.pipeline import Pipeline
from nanodiffusion.server.app import create_app

REQUESTS = 100
MAX_QUEUE = 4
PROGRESS_SHARE = 0.2         # the slowest /progress poll, as a share of the burst's wall time (CPU-speed free)
RSS_GROWTH_LIMIT = 64 << 20  # bytes the second burst may add to the first's


def bodies(size: int) -> list[tuple[str, str, dict | None]]:
    """One of each kind of request: txt2img, img2img, inpaint, a web job, settings and catalogue reads."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return [
        ("POST", "/sdapi/v1/txt2img", {"prompt": "a red circle above a blue square", "steps": 1, "seed": 1}),
        ("POST", "/sdapi/v1/img2img", {"prompt": "a green triangle", "init_images": [b64_png(image)], "steps": 2,
                                       "denoising_strength": 0.5}),
        ("POST", "/sdapi/v1/img2img", {"prompt": "(a blue:1.2) square", "init_images": [b64_png(image)],
                                       "mask": b64_png(mask), "steps": 2}),
        ("POST", "/api/jobs", {"prompt": "two circles", "steps": 1}),
        ("GET", "/sdapi/v1/options", None),
        ("GET", "/sdapi/v1/samplers", None),
    ]


async def burst(url: str, size: int) -> tuple[list[int], float, int]:
    """REQUESTS requests at once while /progress is polled: (statuses, slowest poll / burst time, most jobs seen)."""
    kinds = bodies(size)
    done = asyncio.Event()
    slowest, most_jobs = 0.0, 0

    async def poll(client: httpx.AsyncClient) -> None:
        nonlocal slowest, most_jobs
        while not done.is_set():
            start = time.perf_counter()
            response = await client.get("/sdapi/v1/progress", params={"skip_current_image": True})
            slowest = max(slowest, time.perf_counter() - start)
            most_jobs = max(most_jobs, response.json()["state"]["job_count"])
            await asyncio.sleep(0.05)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        method, path, body = kinds[i % len(kinds)]
        return (await client.request(method, path, json=body)).status_code

    limits = httpx.Limits(max_connections=REQUESTS + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=600) as watcher:
        began = time.perf_counter()
        poller = asyncio.create_task(poll(watcher))
        statuses = await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))
        while (await watcher.get("/sdapi/v1/progress")).json()["state"]["job_count"]:
            await asyncio.sleep(0.1)   # the web jobs run on after their 200
        done.set()
        await poller
    return statuses, slowest / (time.perf_counter() - began), most_jobs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hundred_concurrent_requests_against_the_builtin_model(tmp_path):
    pipe = Pipeline.load()
    app = create_app(pipe, outputs=tmp_path, max_queue=MAX_QUEUE)
    process = psutil.Process()
    with running(app) as url:
        assert httpx.post(url + "/sdapi/v1/txt2img", json={"steps": 1}, timeout=600).status_code == 200   # warm up
        first, slowest_first, jobs_first = asyncio.run(burst(url, pipe.default_size))
        rss_first = process.memory_info().rss
        second, slowest_second, jobs_second = asyncio.run(burst(url, pipe.default_size))
        rss_second = process.memory_info().rss
    for statuses in (first, second):
        assert set(statuses) <= {200, 429} and statuses.count(200) > REQUESTS // 6   # the reads always pass
        assert statuses.count(429) > 0
    assert max(jobs_first, jobs_second) <= MAX_QUEUE + 1
    assert max(slowest_first, slowest_second) < PROGRESS_SHARE
    assert rss_second - rss_first < RSS_GROWTH_LIMIT, f"RSS grew {(rss_second - rss_first) >> 20} MB"
