"""How true each colour-shape pair's colour comes out in generated images (docs/builtin.md).

For the images of `nanodiff eval` folders whose prompt names one colour-shape pair (single-object and counting
prompts), per pair: the median over images of the object pixels' median hue, and the object pixels (coloured
enough for the evaluator) whose nearest palette hue is another colour, per 1000. vae_pairs.py asks the same of
the autoencoder alone; this asks it of the whole model.

    python benchmarks/pair_hues.py eval-heldout eval-train    # folders written by `nanodiff eval --generate`
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from nanodiffusion.data.captions import parse_caption
from nanodiffusion.data.shapes import HELDOUT_PAIRS
from nanodiffusion.evaluate import MIN_CHROMA, PALETTE_NAMES, chroma, folder_prompt, hue, nearest_hue


def pair_hues(folders: list[Path]) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(colour, shape) -> (images, median object hue in degrees, other-hue object pixels per 1000)."""
    medians, other, pixels = defaultdict(list), defaultdict(int), defaultdict(int)
    for folder in folders:
        for file in sorted(folder.glob("*.png")):
            prompt = parse_caption(folder_prompt(file, ""))
            if prompt.kind not in ("single", "counting") or len(set(prompt.objects)) != 1 or not prompt.objects[0][1]:
                continue
            shape, color = prompt.objects[0]
            with Image.open(file) as image:
                rgb = np.asarray(image.convert("RGB"))
            objects = rgb[chroma(rgb) >= MIN_CHROMA]
            medians[color, shape].append(float(np.median(hue(objects))))
            other[color, shape] += int((nearest_hue(objects) != 1 + PALETTE_NAMES.index(color)).sum())
            pixels[color, shape] += len(objects)
    return {pair: (len(m), float(np.median(m)), 1000 * other[pair] / max(pixels[pair], 1))
            for pair, m in sorted(medians.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders of generated images with their prompts")
    args = parser.parse_args()
    print("| pair | images | median hue | other-hue px per 1000 |\n|---|---:|---:|---:|")
    for (color, shape), (images, median, other) in pair_hues(args.folders).items():
        mark = "*" if (color, shape) in HELDOUT_PAIRS else ""
        print(f"| {mark}{color} {shape} | {images} | {median:.1f} | {other:.1f} |")


if __name__ == "__main__":
    main()
