"""`nanodiff eval`: generate held-out (or training) prompts with a model, then score them."""

from __future__ import annotations

import argparse
from pathlib import Path

from .batch import BatchJob, generate_jobs
from .data.shapes import sample_prompts
from .errors import NanoDiffusionError
from .evaluate import evaluate_folder, format_table


def generate_prompt_images(pipe, folder: Path, n: int, split: str, seed: int, steps: int,
                           cfg: float | None, sampler: str, layout_cfg: float | None = None) -> None:
    """One image per prompt (seed + i), saved as PNG with its parameters (the prompt is the first line), through
    the batch path (batch.py): split across `accelerate launch` processes, images already there are kept."""
    settings = {"steps": steps, "cfg": cfg, "sampler": sampler, **({"layout_cfg": layout_cfg} if layout_cfg is not None else {})}
    jobs = [BatchJob(i, text, f"{i:04d}.png", {**settings, "seed": seed + i})
            for i, (_, text) in enumerate(sample_prompts(n, seed=seed, split=split))]
    summary = generate_jobs(pipe, jobs, folder)
    if summary.failed:
        raise NanoDiffusionError(f"{len(summary.failed)} of {n} images failed: {summary.failed[0]}")


def run_eval(args: argparse.Namespace) -> dict:
    """Optionally generate N prompts into the folder, then print (and save) the per-category table."""
    folder = Path(args.folder or f"eval-{args.split}")
    if args.generate:
        from .pipeline import Pipeline

        pipe = Pipeline.load(args.model, precision=getattr(args, "precision", None))
        generate_prompt_images(pipe, folder, args.generate, args.split, args.seed, args.steps, args.cfg,
                               args.sampler, getattr(args, "layout_cfg", None))
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return {}
    results = evaluate_folder(folder)
    table = format_table(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    return results
