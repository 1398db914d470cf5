"""The README's picture: the built-in model on a few prompts (rows), several seeds each (columns), labelled.

    python benchmarks/builtin_grid.py -o docs/builtin-grid.png    # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw, ImageFont

from nanodiffusion.pipeline import Pipeline

PROMPTS = [
    "a red circle above a blue square",
    "two green triangles",
    "a yellow star left of a purple circle",
    "three cyan squares",
    "a blue triangle below a red star",
    "a purple square",
]


def labelled_row(prompt: str, images: list[Image.Image], scale: int, label_width: int) -> Image.Image:
    """One row: the prompt as text on the left, then the images enlarged `scale` times (nearest neighbour)."""
    size = images[0].width * scale
    row = Image.new("RGB", (label_width + size * len(images), size), "white")
    ImageDraw.Draw(row).text((8, size // 2 - 8), prompt, fill="black", font=ImageFont.load_default(size=15))
    for i, image in enumerate(images):
        row.paste(image.resize((size, size), Image.NEAREST), (label_width + i * size, 0))
    return row


def main() -> None:
    """Generate PROMPTS x --seeds images with the built-in model (or --model) and save them as one labelled grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/builtin-grid.png")
    parser.add_argument("--model", default=None, help="pipeline folder or file (default: the built-in model)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=int, default=2, help="pixel enlargement of each 64x64 image")
    args = parser.parse_args()
    pipe = Pipeline.load(args.model)
    rows = [labelled_row(p, pipe(p, steps=args.steps, seed=0, batch=args.seeds), args.scale, 290)
            for p in PROMPTS]
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        grid.paste(row, (0, i * row.height))
    grid.save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
