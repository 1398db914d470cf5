"""Batch generation over a prompts file, split across the processes of `accelerate launch`.

A prompts file holds one job per line: plain text is a prompt; a line starting with `{` is a JSON object
with `prompt` and any of the per-job settings below (JSONL). Every job has its own seed (`seed`, else the
base seed + the job's index) and draws its noise on the CPU, so its image is the same bytes whatever the
number of processes or machines. Process r of N takes every N-th of the jobs still to do. A job whose PNG
already exists with the same parameters text (prompt, settings, model hash, LoRAs) is skipped, so a killed
run started again finishes only what is missing. A job that fails is reported and the others go on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from .errors import NanoDiffusionError
from .images import save_png
from .lora_files import parse_lora_arg
from .prompts import format_parameters, parse_parameters

JOB_KEYS = {"prompt": str, "negative": str, "seed": int, "steps": int, "cfg": (int, float), "sampler": str,
            "schedule": str, "width": int, "height": int, "size": (int, str), "lora": (str, list), "name": str}


@dataclass(frozen=True)
class BatchJob:
    """One image to make: its prompt, pipeline settings, LoRAs and output file name."""

    index: int
    prompt: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)   # keyword arguments of Pipeline.__call__
    loras: tuple[tuple[Path, float], ...] = ()


@dataclass
class Summary:
    """What one process did."""

    generated: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def parse_size(value: int | str, where: str) -> tuple[int, int]:
    """`size`: 64 (square) or "96x64" (width x height)."""
    if isinstance(value, int):
        return value, value
    width, x, height = value.lower().partition("x")
    if not (x and width.strip().isdigit() and height.strip().isdigit()):
        raise NanoDiffusionError(f"{where}: size {value!r} is not WIDTHxHEIGHT or a number, e.g. \"96x64\"")
    return int(width), int(height)


def parse_line(text: str, where: str) -> dict[str, Any]:
    """One line of a prompts file -> its settings (JSON object or a plain prompt)."""
    if not text.startswith("{"):
        return {"prompt": text}
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise NanoDiffusionError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise NanoDiffusionError(f"{where}: a JSON line needs a \"prompt\" text, e.g. {{\"prompt\": \"a red circle\"}}")
    for key, value in entry.items():
        if key not in JOB_KEYS:
            raise NanoDiffusionError(f"{where}: unknown setting {key!r}; use any of: {', '.join(JOB_KEYS)}")
        if not isinstance(value, JOB_KEYS[key]) or isinstance(value, bool):
            raise NanoDiffusionError(f"{where}: {key} {value!r} has the wrong type")
    return entry


def make_job(index: int, entry: dict[str, Any], defaults: dict[str, Any], base_seed: int,
             loras: list[str], where: str) -> BatchJob:
    """A job from a line's settings over the command's defaults; seed = base_seed + index unless given."""
    settings = {**defaults, "seed": base_seed + index}
    names = {"negative": "negative_prompt", "seed": "seed", "steps": "steps", "cfg": "cfg", "sampler": "sampler",
             "schedule": "schedule", "width": "width", "height": "height"}
    settings.update({names[key]: value for key, value in entry.items() if key in names})
    if "size" in entry:
        settings["width"], settings["height"] = parse_size(entry["size"], where)
    extra = entry.get("lora", [])
    extra = [extra] if isinstance(extra, str) else extra
    if not all(isinstance(text, str) for text in extra):
        raise NanoDiffusionError(f"{where}: lora must be \"FILE[:WEIGHT]\" or a list of them")
    return BatchJob(index=index, prompt=entry["prompt"], name=entry.get("name", f"{index:05d}.png"),
                    settings=settings, loras=tuple(parse_lora_arg(text) for text in [*loras, *extra]))


def read_jobs(path: str | Path, defaults: dict[str, Any], base_seed: int = 0,
              loras: list[str] | None = None) -> list[BatchJob]:
    """Every job of a prompts file (blank lines and lines starting with # are skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise NanoDiffusionError(f"cannot read the prompts file {path}: {error}") from None
    jobs = []
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if text and not text.startswith("#"):
            where = f"{path.name} line {number}"
            jobs.append(make_job(len(jobs), parse_line(text, where), defaults, base_seed, loras or [], where))
    if not jobs:
        raise NanoDiffusionError(f"{path} holds no prompts: write one prompt per line (or JSON objects)")
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise NanoDiffusionError(f"{path}: two jobs write the same file {max(names, key=names.count)}: "
                                 "give each a different \"name\"")
    return jobs


def with_loras(parameters: str, loras: tuple[tuple[Path, float], ...]) -> str:
    """The parameters text with the job's LoRA files added (`Lora: ink:0.8 sketch:1`)."""
    if not loras:
        return parameters
    prompt, negative, settings = parse_parameters(parameters)
    settings["Lora"] = " ".join(f"{path.stem}:{weight:g}" for path, weight in loras)
    return format_parameters(prompt, negative, settings)


def expected_parameters(pipe: Any, job: BatchJob) -> str:
    """The parameters text the job's image will carry: a file holding this text is this job, already done."""
    from .request import GenerationRequest
    from .samplers import get_sampler

    r = GenerationRequest.from_kwargs(job.prompt, **job.settings).resolved(pipe)
    text = pipe.parameters_text(r, 0, r.seed, get_sampler(r.sampler).display_name, r.width, r.height)
    return with_loras(text, job.loras)


def is_done(path: Path, parameters: str) -> bool:
    """True when `path` is a readable PNG whose parameters text is `parameters`."""
    try:
        with Image.open(path) as image:
            return image.info.get("parameters") == parameters
    except (OSError, SyntaxError):
        return False


def generate_one(pipe: Any, job: BatchJob, path: Path) -> None:
    """Make one job's image with its LoRAs applied and save it with its parameters."""
    image = pipe(job.prompt, **job.settings, loras=job.loras)[0]
    image.info["parameters"] = with_loras(image.info["parameters"], job.loras)
    save_png(image, path)


def pending_jobs(pipe: Any, jobs: list[BatchJob], outdir: Path) -> tuple[list[BatchJob], int]:
    """The jobs whose image is not there yet with the same parameters, and how many were skipped."""
    todo = []
    for job in jobs:
        try:
            done = is_done(outdir / job.name, expected_parameters(pipe, job))
        except NanoDiffusionError:
            done = False   # a bad setting: run it, so the failure is reported with the others
        if not done:
            todo.append(job)
    return todo, len(jobs) - len(todo)


def generate_jobs(pipe: Any, jobs: list[BatchJob], outdir: str | Path, *, progress: bool = True) -> Summary:
    """Run this process's share of the jobs (every N-th of those still to do) and gather every process's summary
    on all of them. Without `accelerate launch` this is one process doing everything."""
    from accelerate import PartialState

    state = PartialState()
    outdir = Path(outdir)
    todo, skipped = pending_jobs(pipe, jobs, outdir)
    state.wait_for_everyone()   # every process sees the same folder before anyone writes into it
    mine = todo[state.process_index::state.num_processes]
    summary = Summary(skipped=skipped if state.is_main_process else 0)
    desc = f"batch [{state.process_index + 1}/{state.num_processes}]" if state.num_processes > 1 else "batch"
    for job in tqdm(mine, desc=desc, position=state.process_index, disable=not progress):
        try:
            generate_one(pipe, job, outdir / job.name)
            summary.generated += 1
        except Exception as error:   # noqa: BLE001 - one bad prompt must not stop the batch
            message = f"job {job.index} ({job.name}, {job.prompt[:60]!r}): {error}"
            tqdm.write(f"error: {message}")
            summary.failed.append(message)
    state.wait_for_everyone()
    return merge(state, summary)


def merge(state: Any, summary: Summary) -> Summary:
    """The sum of every process's summary."""
    if state.num_processes == 1:
        return summary
    from accelerate.utils import gather_object

    total = Summary()
    for part in gather_object([summary]):
        total.generated += part.generated
        total.skipped += part.skipped
        total.failed += part.failed
    return total


def run_batch(pipe: Any, args: Any) -> Summary:
    """`nanodiff generate --prompts FILE --outdir DIR`: the flags are every job's defaults."""
    from accelerate import PartialState

    if args.init or args.mask or args.control_image:
        raise NanoDiffusionError("--prompts does not take --init, --mask or --control-image: run those one by one")
    defaults = {"negative_prompt": args.negative, "steps": args.steps, "sampler": args.sampler,
                "schedule": args.schedule, "cfg": args.cfg, "width": args.width, "height": args.height,
                "clip_skip": args.clip_skip}
    jobs = read_jobs(args.prompts, defaults, args.seed or 0, args.lora)
    pipe.loras = []   # the command's --lora files are in every job's own LoRAs (and its parameters text)
    outdir = Path(args.outdir)
    start = time.perf_counter()
    summary = generate_jobs(pipe, jobs, outdir)
    if PartialState().is_main_process:
        print(f"batch: {len(jobs)} jobs: {summary.generated} generated, {summary.skipped} already done, "
              f"{len(summary.failed)} failed, in {time.perf_counter() - start:.1f} s -> {outdir}")
    if summary.failed:
        raise NanoDiffusionError(f"{len(summary.failed)} of {len(jobs)} jobs failed (messages above); "
                                 "fix them and run again: finished images are kept")
    return summary
