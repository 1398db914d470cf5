"""`nanodiff learn`: the diffusion learning path as lessons, each a thin script over the library that trains a
small model on the CPU in minutes and writes its pictures and a markdown page (equation, code, numbers)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import choice_error


@dataclass(frozen=True)
class Lesson:
    """One lesson: its command name, module in this package, title and what it shows."""

    name: str
    module: str
    title: str
    shows: str


LESSONS = [Lesson(*fields) for fields in (
    ("forward", "forward", "The forward process and noise schedules", "images at several t, alpha_bar and log-SNR"),
    ("ddpm-2d", "ddpm_2d", "DDPM on a 2-D toy", "ancestral sampling trajectories, loss curve"),
    ("score-langevin", "score_langevin", "Score matching and annealed Langevin dynamics",
     "score fields per noise level, Langevin samples on 2-D data and shapes"),
    ("sde-ode", "sde_ode", "The reverse SDE and the probability-flow ODE", "trajectories, error vs steps"),
    ("classifier-guidance", "classifier_guidance", "Classifier guidance", "a noisy classifier steering a model"),
    ("cfg", "cfg", "Classifier-free guidance", "scale sweep on the built-in model, evaluator score per scale"),
    ("ddim-inversion", "ddim_inversion", "DDIM: determinism, inversion, interpolation",
     "image -> noise -> image, slerp between noises"),
    ("latent", "latent", "Latent diffusion", "what the VAE keeps, latent channels, cost per step"),
    ("attention", "attention", "Cross-attention", "per-token attention maps over the steps"),
    ("consistency", "consistency", "Consistency distillation", "a 1-4 step student against its teacher"),
    ("dit-flow", "dit_flow", "DiT and rectified flow", "a small DiT vs the UNet, straight vs curved paths"),
    ("controlnet", "controlnet", "ControlNet", "what a control signal changes"),
    ("lora", "lora", "LoRA", "what a low-rank update changes"),
)]


def find_lesson(name: str) -> Lesson:
    """A lesson by name, or an error listing them."""
    for lesson in LESSONS:
        if lesson.name == name:
            return lesson
    raise choice_error("lesson", name, [lesson.name for lesson in LESSONS])


def run_lesson(name: str, out: str | Path) -> Path:
    """Run one lesson, writing into `out`; returns its markdown page."""
    from .report import pyplot

    lesson = find_lesson(name)
    pyplot()   # fail early, with the extra's name, when matplotlib is missing
    module = importlib.import_module(f"{__name__}.{lesson.module}")
    page = module.run(Path(out), lesson)
    write_index(Path(out))
    return page


def write_index(out: Path) -> Path:
    """The course's contents page `index.md`: every lesson in order, linked where its page exists in `out`."""
    lines = ["# The diffusion learning path", "",
             "Each lesson trains a small model on the CPU in minutes (or uses the built-in model) and shows one "
             "concept; run one with `nanodiff learn NAME -o DIR`. Read them in order:", ""]
    for i, lesson in enumerate(LESSONS, 1):
        title = f"[{lesson.title}]({lesson.name}.md)" if (out / f"{lesson.name}.md").is_file() else lesson.title
        lines.append(f"{i}. {title} (`nanodiff learn {lesson.name}`): {lesson.shows}")
    path = out / "index.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def listing() -> str:
    """The lessons in order, one per line."""
    width = max(len(lesson.name) for lesson in LESSONS)
    return "\n".join(f"{i:2d}. {lesson.name:<{width}}  {lesson.title}: {lesson.shows}"
                     for i, lesson in enumerate(LESSONS, 1))
