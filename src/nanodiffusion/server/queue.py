"""One generation at a time: a worker thread, a bounded queue of jobs, progress, previews, interrupts.

HTTP handlers never touch the model. They submit a `Job` (the pipeline's keyword arguments, how many
iterations, whether to save), and read its progress; the single worker thread runs jobs in order, turns
the sampler's x0 estimate into a preview image at every step, and honours cancel / interrupt / skip by
raising `Interrupted` from the pipeline callback.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import NanoDiffusionError
from ..images import save_png, to_pil
from ..pipeline import Interrupted, Pipeline
from ..prompts import format_parameters
from ..request import GenerationRequest
from ..sampler_names import scheduler_label
from ..samplers import get_sampler
from .encoding import image_to_b64
from .errors import public_message, server_folders

log = logging.getLogger(__name__)

KEEP_FINISHED = 64


class QueueFull(Exception):
    """Raised by `Worker.submit` when the queue already holds its maximum number of waiting jobs."""


@dataclass
class Job:
    """One request: `n_iter` pipeline calls with seeds seed, seed + batch, ... and its live state."""

    kwargs: dict[str, Any]
    n_iter: int = 1
    save: bool = False
    previews: bool = True
    preview_every: int = 1
    run: Callable[..., list[Image.Image]] | None = None  # instead of the pipeline: run(pipeline, **kwargs, callback=)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"  # queued -> running -> done | cancelled | failed
    iteration: int = 0
    step: int = 0
    total: int = 0
    preview: str | None = None  # base64 PNG of the latest x0 estimate
    preview_version: int = 0
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # the seed of each image
    saved: list[str] = field(default_factory=list)  # paths relative to the outputs folder
    error: str | None = None
    error_status: int = 0
    created: float = field(default_factory=time.time)
    started: float = 0.0
    interrupt: bool = False
    skip: bool = False
    version: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    warnings: list[str] = field(default_factory=list)   # fall-backs taken (unknown sampler name, ...)
    checkpoint: Any = None  # the model_library.Checkpoint to run on (None: whatever is loaded)
    refiner: Any = None     # the model_library.Checkpoint that takes over at kwargs["refiner_switch_at"], or None
    latest_x0: torch.Tensor | None = field(default=None, repr=False)  # the running call's x0 estimate
    details: dict[str, Any] = field(default_factory=dict)   # `info` keys a script's run sets (all_seeds, ...)

    @property
    def progress(self) -> float:
        """Fraction of all steps of all iterations finished, in [0, 1]."""
        if self.status == "done":
            return 1.0
        per_iteration = self.step / self.total if self.total else 0.0
        return min(1.0, (self.iteration + per_iteration) / self.n_iter)

    @property
    def eta(self) -> float:
        """Seconds left, extrapolated from the time taken so far."""
        progress = self.progress
        if not self.started or progress <= 0:
            return 0.0
        elapsed = time.time() - self.started
        return elapsed / progress - elapsed

    def changed(self) -> None:
        """Mark the job as updated so watchers (the SSE stream) send a new event."""
        self.version += 1

    def finish(self, status: str, error: str | None = None, error_status: int = 0) -> None:
        """Enter a final state and wake whoever waits on the job."""
        self.status, self.error, self.error_status = status, error, error_status
        self.changed()
        self.done.set()


class Worker:
    """Runs jobs one at a time on a daemon thread; at most `max_queue` jobs wait behind the running one."""

    def __init__(self, pipeline: Any, outputs: Path | None, max_queue: int = 8, library: Any = None) -> None:
        self.pipeline = pipeline
        self.library = library
        self.outputs = outputs
        self.max_queue = max_queue
        self.waiting: list[Job] = []
        self.current: Job | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self.loop, name="nanodiffusion-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> int:
        """Queue a job and return its position (1 = next to run); raise QueueFull when full."""
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self.full_message())
            self.waiting.append(job)
            self.jobs[job.id] = job
            self.forget_old()
            self.lock.notify()
            return len(self.waiting)

    def has_room(self) -> bool:
        """Whether a job submitted now would be queued (checked again by submit)."""
        with self.lock:
            return len(self.waiting) < self.max_queue

    def full_message(self) -> str:
        """The 429 message."""
        return f"the queue is full ({self.max_queue} jobs waiting): retry later"

    def position(self, job: Job) -> int:
        """1-based place in the queue of a waiting job, 0 once it runs."""
        with self.lock:
            return self.waiting.index(job) + 1 if job in self.waiting else 0

    def job_count(self) -> int:
        """Jobs running or waiting."""
        with self.lock:
            return len(self.waiting) + (self.current is not None)

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or stop the running one at its next step."""
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                job.finish("cancelled")
                self.touch_waiting()
            elif job is self.current:
                job.interrupt = True

    def interrupt(self) -> None:
        """Stop the running job (all its iterations), like the web UI's Interrupt."""
        with self.lock:
            if self.current is not None:
                self.current.interrupt = True

    def skip(self) -> None:
        """Stop the running job's current iteration and go on with the next one."""
        with self.lock:
            if self.current is not None:
                self.current.skip = True

    def forget_old(self) -> None:
        """Keep only the latest finished jobs (plus all live ones)."""
        finished = [key for key, job in self.jobs.items() if job.done.is_set()]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[key]

    def touch_waiting(self) -> None:
        """Queue positions moved: let every waiting job's watchers know."""
        for job in self.waiting:
            job.changed()

    def loop(self) -> None:
        """The worker thread: take the next job, run it, repeat."""
        while True:
            with self.lock:
                while not self.waiting:
                    self.lock.wait()
                job = self.current = self.waiting.pop(0)
                self.touch_waiting()
            try:
                self.run(job)
            finally:
                with self.lock:
                    self.current = None

    def run(self, job: Job) -> None:
        """Run a job's iterations; failures become the job's error, never kill the worker."""
        job.status, job.started = "running", time.time()
        job.changed()
        try:
            if job.checkpoint is not None and self.library is not None:
                with self.library.lock:
                    self.pipeline = self.library.use(job.checkpoint)
                    if job.refiner is not None:
                        job.kwargs["refiner"] = self.library.refiner(job.refiner)
            for iteration in range(job.n_iter):
                if job.interrupt:
                    break
                job.iteration, job.step, job.skip, job.latest_x0 = iteration, 0, False, None
                shift = iteration * job.kwargs.get("batch", 1)
                seed = job.kwargs["seed"] + shift
                call = {**job.kwargs, "seed": seed}
                if "subseed" in job.kwargs:   # variation seeds advance with the seeds, as in the web UI
                    call["subseed"] = job.kwargs["subseed"] + shift
                try:
                    run = self.pipeline if job.run is None else partial(job.run, self.pipeline)
                    images = run(**call, callback=self.callback(job))
                except Interrupted:
                    images = self.partial(job, call)
                    if not images:
                        continue
                job.images.extend(images)
                job.seeds.extend(seed + i for i in range(len(images)))
                if job.save:
                    job.saved.extend(self.save(image, seed + i) for i, image in enumerate(images))
                job.changed()
        except NanoDiffusionError as error:
            job.finish("failed", self.public(str(error)), 400)
        except Exception as error:  # noqa: BLE001 - report any model failure to the client, keep serving
            log.exception("generation failed")
            job.finish("failed", self.public(f"generation failed: {type(error).__name__}: {error}"), 500)
        else:
            job.latest_x0 = None
            job.finish("cancelled" if job.interrupt and not job.images else "done")

    def public(self, message: str) -> str:
        """An error message as clients may see it (server/errors.py)."""
        return public_message(message, server_folders(self.pipeline, self.outputs))

    def partial(self, job: Job, call: dict[str, Any]) -> list[Image.Image]:
        """On interrupt, the images as far as they got (the last x0 estimate, decoded), as the web UI returns
        them, each with its parameters text like a finished image's; none on skip, or before the first step."""
        if not job.interrupt or job.latest_x0 is None:
            return []
        images = to_pil(self.pipeline.decode(job.latest_x0))
        for i, image in enumerate(images):
            image.info["parameters"] = self.partial_parameters(call, i, image.size, job.run is None)
        return images

    def partial_parameters(self, call: dict[str, Any], i: int, size: tuple[int, int], own: bool) -> str:
        """Image i's parameters text for the settings of an interrupted call: the pipeline's own text when it runs
        the call (a Pipeline), else the web UI's main settings from the call's keywords."""
        seed = call["seed"] + i
        if own and isinstance(self.pipeline, Pipeline):
            try:
                r = GenerationRequest.from_kwargs(**call).resolved(self.pipeline)
                return self.pipeline.parameters_text(r, i, seed, get_sampler(r.sampler).display_name, *size)
            except NanoDiffusionError:   # the call ran with these settings, so this is not expected
                log.exception("parameters of an interrupted image: falling back to the main settings")
        model_hash = getattr(self.pipeline, "model_hash", "")
        return format_parameters(call.get("prompt", ""), call.get("negative_prompt", ""), {
            "Steps": call.get("steps"), "Sampler": call.get("sampler"),
            "Schedule type": scheduler_label(call["schedule"]) if call.get("schedule") else None,
            "CFG scale": f"{call['cfg']:g}" if isinstance(call.get("cfg"), (int, float)) else None, "Seed": seed,
            "Size": "{}x{}".format(*size), "Model hash": model_hash[:10] or None,
            "Model": getattr(self.pipeline, "name", None),
            "Denoising strength": call.get("strength") if call.get("init_image") is not None else None,
            "Version": "nanodiffusion",
        })

    def callback(self, job: Job):
        """The pipeline callback: record the step and the x0 estimate, publish a preview of it, stop when asked."""

        def on_step(step: int, total: int, x0: torch.Tensor) -> None:
            if job.interrupt or job.skip:
                raise Interrupted
            job.step, job.total, job.latest_x0 = step, total, x0
            if job.previews and (step % job.preview_every == 0 or step == total):
                job.preview = image_to_b64(self.pipeline.preview(x0[:1])[0])
                job.preview_version += 1
            job.changed()

        return on_step

    def save(self, image: Image.Image, seed: int) -> str:
        """Write a PNG as outputs/YYYY-MM-DD/NNNNN-SEED.png; the name never comes from the request."""
        folder = self.outputs / date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
        name = f"{max(numbers, default=0) + 1:05d}-{seed}.png"
        save_png(image, folder / name)
        return f"{folder.name}/{name}"
