"""How faithfully an autoencoder reproduces each colour-shape pair of the shapes world (docs/builtin.md).

For each of the 24 (colour, shape) pairs: N scenes of 1-4 objects of that pair, encoded and decoded (posterior
mode). Two figures per pair: wrong-hue pixels per 1000 object pixels (reconstructed pixels, on or near an
object, coloured enough for the evaluator but of another palette hue: the coloured fringes and patches), and how
many reconstructions the evaluator no longer scores as the scene's prompt. Held-out pairs are marked: they are
a diagnostic, never a basis for choosing.

    python benchmarks/vae_pairs.py src/nanodiffusion/weights/builtin/vae runs/builtin/vae/vae    # ~1 min each
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from nanodiffusion.data.captions import COLORS, SHAPES, Prompt
from nanodiffusion.data.shapes import HELDOUT_PAIRS, PALETTE, realize, render
from nanodiffusion.evaluate import MIN_CHROMA, chroma, nearest_hue, score
from nanodiffusion.images import to_pil, to_tensor
from nanodiffusion.models.vae import AutoencoderKL
from nanodiffusion.train.tiny_vae import load_teacher


@torch.no_grad()
def pair_errors(vae: AutoencoderKL, color: str, shape: str, n: int, seed: int = 0) -> tuple[float, int]:
    """(wrong-hue pixels per 1000 object pixels, reconstructions the evaluator fails) over n scenes of the pair."""
    rng = random.Random(f"vae-pairs:{seed}:{color}:{shape}")
    prompts = [Prompt("counting", ((shape, color),) * (1 + i % 4)) for i in range(n)]
    images = [render(realize(prompt, rng)) for prompt in prompts]
    x = torch.stack([to_tensor(image)[0] for image in images])
    reconstructions = to_pil(vae.decode(vae.encode(x).mode()).clamp(-1, 1))
    wrong = objects = failed = 0
    label = 1 + list(PALETTE).index(color)
    for image, reconstruction, prompt in zip(images, reconstructions, prompts):
        original, rgb = np.asarray(image), np.asarray(reconstruction)
        near = binary_dilation(chroma(original) >= MIN_CHROMA, iterations=2)
        wrong += int((near & (chroma(rgb) >= MIN_CHROMA) & (nearest_hue(rgb) != label)).sum())
        objects += int((chroma(original) >= MIN_CHROMA).sum())
        failed += not score(reconstruction, prompt)["correct"]
    return 1000 * wrong / objects, failed


def main() -> None:
    """Print one table per VAE folder: rows colours, columns shapes, cells 'wrong-hue per mille (failed/N)'."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vaes", nargs="+", type=Path, help="vae/ folders (config.json + safetensors)")
    parser.add_argument("-n", type=int, default=60, help="scenes per pair")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for folder in args.vaes:
        vae, _ = load_teacher(None, str(folder))
        print(f"\n{folder}  (* held-out pair; cell: wrong-hue px per 1000 object px (reconstructions failed/{args.n}))")
        print("| colour | " + " | ".join(SHAPES) + " |\n|---|" + "---:|" * len(SHAPES))
        for color in COLORS:
            cells = []
            for shape in SHAPES:
                per_mille, failed = pair_errors(vae, color, shape, args.n)
                cells.append(f"{'*' if (color, shape) in HELDOUT_PAIRS else ''}{per_mille:.1f} ({failed})")
            print(f"| {color} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
