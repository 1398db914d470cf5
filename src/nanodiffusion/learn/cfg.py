"""Lesson `cfg`: classifier-free guidance (Ho & Salimans 2022) on the built-in model: a scale sweep, scored by the
compositional evaluator."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from ..data.shapes import sample_prompts
from ..evaluate import evaluate
from ..images import image_grid
from .builtin import load
from .report import Page, pyplot

SCALES, PROMPTS, SHOWN, STEPS = (1.0, 3.0, 7.0, 12.0), 12, 6, 20


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("The built-in model was trained with the caption dropped 10% of the time, so one network is both the "
              "conditional and the unconditional model. Guidance extrapolates from the unconditional prediction "
              "towards the conditional one; scale 1 is the conditional model alone:")
    page.equation(r"\tilde D(x,\sigma) = D(x,\sigma;\varnothing) + w\,\big(D(x,\sigma;c) - D(x,\sigma;\varnothing)\big)")
    page.code("guidance.py:cfg_denoiser", "pipeline.py:Pipeline.generate")
    pipe = load()
    cases = sample_prompts(PROMPTS, seed=1, split="train")
    images = {scale: [] for scale in SCALES}
    for scale in tqdm(SCALES, desc="scales", leave=False):
        for i, (_, text) in enumerate(cases):
            images[scale] += pipe(text, steps=STEPS, sampler="euler", cfg=scale, seed=i)
    scores = {scale: evaluate(images[scale], [prompt for prompt, _ in cases]) for scale in SCALES}
    shown = [images[scale][i] for i in range(SHOWN) for scale in SCALES]
    page.image(image_grid(shown, columns=len(SCALES)), "grid",
               f"Rows: {'; '.join(text for _, text in cases[:SHOWN])}. Columns: guidance scale "
               f"{', '.join(f'{s:g}' for s in SCALES)} (same seed per row, Euler, {STEPS} steps)")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(SCALES, [scores[s]["overall"] for s in SCALES], "o-")
    ax.set(xscale="log", xlabel="guidance scale w", ylabel="evaluator accuracy",
           title=f"{PROMPTS} training-split prompts", ylim=(0, 1))
    ax.set_xticks(SCALES, [f"{s:g}" for s in SCALES])
    page.figure(fig, "accuracy", "Compositional evaluator accuracy (mean over prompt categories) by scale")
    page.table(["scale", "evaluator accuracy", "images correct"],
               [[f"{s:g}", scores[s]["overall"], f"{sum(item['correct'] for item in scores[s]['items'])} / "
                 f"{PROMPTS}"] for s in SCALES])
    best = max(SCALES, key=lambda s: scores[s]["overall"])
    page.text(f"The model's default scale is {pipe.default_cfg:g}; on these {PROMPTS} prompts the evaluator scores "
              f"best at scale {best:g}. Higher scales make colours more saturated and push shapes towards "
              "exaggerated forms (see the grid); how much guidance helps composition depends on the model.")
    return page.write()
