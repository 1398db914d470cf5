"""`nanodiff eval`: generate held-out (or training) prompts with a model, then score them."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from .data.shapes import sample_prompts
from .evaluate import evaluate_folder, format_table
from .images import save_png


def generate_prompt_images(pipe, folder: Path, n: int, split: str, seed: int, steps: int,
                           cfg: float | None, sampler: str) -> None:
    """One image per prompt (seed + i), saved as PNG with its parameters (the prompt is the first line)."""
    for i, (_, text) in enumerate(tqdm(sample_prompts(n, seed=seed, split=split), desc="generating")):
        image = pipe(text, steps=steps, cfg=cfg, seed=seed + i, sampler=sampler)[0]
        save_png(image, folder / f"{i:04d}.png")


def run_eval(args: argparse.Namespace) -> dict:
    """Optionally generate N prompts into the folder, then print (and save) the per-category table."""
    folder = Path(args.folder or f"eval-{args.split}")
    if args.generate:
        from .pipeline import Pipeline

        pipe = Pipeline.load(args.model)
        generate_prompt_images(pipe, folder, args.generate, args.split, args.seed, args.steps, args.cfg,
                               args.sampler)
    results = evaluate_folder(folder)
    table = format_table(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    return results
