"""Teach the built-in model a shape it has never seen — a cross — from a few dozen rendered images.

The built-in model knows four shapes (circle, square, triangle, star). We render N single-cross scenes with
the shapes world's own renderer and layout (one extra polygon, registered only inside this script), captioned
"a <colour> cross", and fine-tune on them with LoRA and with DreamBooth + prior preservation. "cross" is not
in the built-in word vocabulary, so it reads as <unk>: a token the model never saw, the role DreamBooth gives
its rare identifier "sks". Then, for the base model and each fine-tuned one:
  * concept: generate "a <colour> cross" for every colour and S seeds, and detect with the evaluator's
    detector, its template set extended by the cross: correct = exactly one object, a cross, of that colour;
  * old categories: evaluate() on the usual training-distribution prompts (the six GenEval categories).
Writes the table to stdout and, with --markdown FILE, to that file.

    python benchmarks/concept.py --output runs/concept --markdown runs/concept/table.md
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from nanodiffusion import evaluate
from nanodiffusion.data import shapes
from nanodiffusion.data.captions import COLORS, SHAPES, Prompt
from nanodiffusion.evaluate import CATEGORY_NAMES, detect
from nanodiffusion.images import save_png
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.train.finetune import finetune

CONCEPT = "cross"
ARM = 0.3  # half width of the cross's arms, as a fraction of its half side
CROSS = ((-ARM, -1.0), (ARM, -1.0), (ARM, -ARM), (1.0, -ARM), (1.0, ARM), (ARM, ARM), (ARM, 1.0), (-ARM, 1.0),
         (-ARM, ARM), (-1.0, ARM), (-1.0, -ARM), (-ARM, -ARM))


@contextmanager
def concept_world():
    """The shapes renderer and the evaluator's shape templates, each with the cross added (inside the block)."""
    with mock.patch.dict(shapes.POLYGONS, {CONCEPT: CROSS}), mock.patch.object(evaluate, "SHAPES", (*SHAPES, CONCEPT)):
        yield


def write_concept_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n single-cross scenes cycling through the colours, laid out like the shapes world's, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"concept:{seed}")
    with concept_world():
        for i in range(n):
            color = COLORS[i % len(COLORS)]
            scene = shapes.realize(Prompt("colors", ((CONCEPT, color),)), rng)
            save_png(shapes.render(scene, 64), folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"a {color} {CONCEPT}\n")
    return folder


def concept_score(pipe: Pipeline, samples: int, folder: Path, steps: int) -> dict:
    """Fraction of "a <colour> cross" images showing exactly one cross of that colour (and with any cross)."""
    folder.mkdir(parents=True, exist_ok=True)
    correct = any_cross = total = 0
    with concept_world():
        for color in COLORS:
            for seed in range(samples):
                image = pipe(f"a {color} {CONCEPT}", steps=steps, seed=seed, sampler="euler")[0]
                save_png(image, folder / f"{color}-{seed}.png")
                found = detect(image)
                correct += len(found) == 1 and (found[0].shape, found[0].color) == (CONCEPT, color)
                any_cross += any(d.shape == CONCEPT for d in found)
                total += 1
    return {"correct": correct / total, "any": any_cross / total, "total": total}


def old_categories(pipe: Pipeline, n: int, folder: Path, steps: int) -> dict:
    """evaluate() on n training-distribution prompts (all six categories), one seed each."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [text for _, text in shapes.sample_prompts(n, seed=0, split="train")]
    images = [pipe(text, steps=steps, seed=i, sampler="euler")[0] for i, text in enumerate(prompts)]
    for i, image in enumerate(images):
        save_png(image, folder / f"{i:03d}.png")
    return evaluate.evaluate(images, prompts)


def measure(name: str, pipe: Pipeline, args: argparse.Namespace, seconds: float = 0.0) -> dict:
    """One row of the table: concept and old-category scores of a model."""
    root = Path(args.output) / "samples" / name
    started = time.time()
    row = {"model": name, "concept": concept_score(pipe, args.samples, root / "concept", args.sample_steps),
           "old": old_categories(pipe, args.eval_prompts, root / "old", args.sample_steps),
           "train_s": round(seconds, 1)}
    row["old"].pop("items")
    print(f"{name}: concept {row['concept']['correct']:.0%}, old overall {row['old']['overall']:.1%} "
          f"(measured in {time.time() - started:.0f} s)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one row per model, concept accuracy, then every old category and the overall score."""
    kinds = list(rows[0]["old"]["categories"])
    head = ["model", f"'a <colour> {CONCEPT}' correct", f"any {CONCEPT}",
            *(CATEGORY_NAMES[k] for k in kinds), "old overall", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [row["model"], f"{row['concept']['correct']:.0%}", f"{row['concept']['any']:.0%}",
                 *(f"{row['old']['categories'][k]['accuracy']:.0%}" for k in kinds),
                 f"{row['old']['overall']:.1%}", f"{row['train_s']:.0f} s" if row["train_s"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model (default: the built-in model)")
    parser.add_argument("--output", default="runs/concept")
    parser.add_argument("--images", type=int, default=48, help="rendered training images of the new shape (<= 50)")
    parser.add_argument("--kinds", default="lora,dreambooth", help="comma-separated: lora, dreambooth")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--conv-rank", type=int, default=8,
                        help="LoCon rank of the res-block convolutions (the built-in UNet draws shapes there)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: finetune's per kind)")
    parser.add_argument("--class-images", type=int, default=48,
                        help="prior-preservation images of training-distribution prompts, all six categories (0: none)")
    parser.add_argument("--samples", type=int, default=4, help="seeds per colour for the concept score")
    parser.add_argument("--eval-prompts", type=int, default=48, help="old-category prompts")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    data = write_concept_images(output / "data", args.images)
    class_prompts = tuple(text for _, text in shapes.sample_prompts(args.class_images, seed=1, split="train"))

    rows = [measure("base", Pipeline.load(args.model), args)]
    for kind in args.kinds.split(","):
        started = time.time()
        result = finetune(kind, data=data, output=output / kind, base=args.model, steps=args.steps, batch_size=8,
                          lr=args.lr, rank=args.rank, conv_rank=args.conv_rank or None,
                          class_prompts=class_prompts, num_class_images=args.class_images,
                          threads=args.threads, checkpoint_every=args.steps)
        seconds = time.time() - started
        pipe = Pipeline.load(args.model if kind == "lora" else result)
        pipe.loras = [(result, 1.0)] if kind == "lora" else []
        prior = f" + prior ({args.class_images})" if args.class_images else ""
        rows.append(measure(f"{kind}{prior}", pipe, args, seconds))

    text = table(rows)
    print(text)
    (output / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
