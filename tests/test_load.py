"""A bounded load test: 100 concurrent mixed requests against the real server with the built-in model.

Every request is answered 200 or 429 (the queue holds at most `MAX_QUEUE` waiting jobs), the server answers
/progress while it generates (the polls see one job after another at work), and memory stays flat from one burst to
the next. Nothing here is timed: the poller's answers themselves show the server stayed responsive.
"""

from __future__ import annotations

import asyncio

import httpx
import psutil
import pytest
from PIL import Image
from serving import b64_png, running

from nanodiffusion.pipeline import Pipeline
from nanodiffusion.server.app import create_app

REQUESTS = 100
MAX_QUEUE = 4
MIN_JOBS_SEEN = 2            # distinct running jobs the /progress poller must see in one burst
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


async def burst(url: str, size: int) -> tuple[list[int], set[tuple[str, int]], int]:
    """REQUESTS requests at once while /progress is polled: (statuses, running (job, step) states seen, most jobs)."""
    kinds = bodies(size)
    done = asyncio.Event()
    seen, most_jobs = set(), 0

    async def poll(client: httpx.AsyncClient) -> None:
        nonlocal most_jobs
        while not done.is_set():
            state = (await client.get("/sdapi/v1/progress", params={"skip_current_image": True})).json()["state"]
            most_jobs = max(most_jobs, state["job_count"])
            if state["job"]:
                seen.add((state["job"], state["sampling_step"]))
            await asyncio.sleep(0.02)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        method, path, body = kinds[i % len(kinds)]
        return (await client.request(method, path, json=body)).status_code

    limits = httpx.Limits(max_connections=REQUESTS + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=600) as watcher:
        poller = asyncio.create_task(poll(watcher))
        statuses = await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))
        while (await watcher.get("/sdapi/v1/progress")).json()["state"]["job_count"]:
            await asyncio.sleep(0.1)   # the web jobs run on after their 200
        done.set()
        await poller
    return statuses, seen, most_jobs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hundred_concurrent_requests_against_the_builtin_model(tmp_path):
    pipe = Pipeline.load()
    app = create_app(pipe, outputs=tmp_path, max_queue=MAX_QUEUE)
    process = psutil.Process()
    with running(app) as url:
        assert httpx.post(url + "/sdapi/v1/txt2img", json={"steps": 1}, timeout=600).status_code == 200   # warm up
        first, seen_first, jobs_first = asyncio.run(burst(url, pipe.default_size))
        rss_first = process.memory_info().rss
        second, seen_second, jobs_second = asyncio.run(burst(url, pipe.default_size))
        rss_second = process.memory_info().rss
    for statuses in (first, second):
        assert set(statuses) <= {200, 429} and statuses.count(200) > REQUESTS // 6   # the reads always pass
        assert statuses.count(429) > 0
    assert max(jobs_first, jobs_second) <= MAX_QUEUE + 1
    for seen in (seen_first, seen_second):
        assert len({job for job, _ in seen}) >= MIN_JOBS_SEEN, seen
    assert rss_second - rss_first < RSS_GROWTH_LIMIT, f"RSS grew {(rss_second - rss_first) >> 20} MB"
