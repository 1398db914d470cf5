"""What the built-in model's layout stage samples: per split and prompt kind, how often the boxes are the right
count, overlap, sit closer than the training scenes' gap, honour the relation, and how small they are.

    python benchmarks/layout_boxes.py [MODEL_FOLDER] [--prompts 400] [--layouts 4]

Prompts are the split's scenes (data/shapes.py), layouts are `sample_boxes` from seeded noise, exactly as
generation draws them. "overlap": two present boxes whose Chebyshev gap is below 0 (they intersect); "close":
below the data's GAP (no training scene has that); "relation": the first two boxes' centres honour the prompt's
relation (data/shapes.py relation_holds).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from nanodiffusion.data.shapes import GAP, relation_holds, scene_caption
from nanodiffusion.models.layout import box_overlap, layout_noise, normalize_boxes
from nanodiffusion.train.builtin import BUILTIN_DIR, load_pipeline_parts


@torch.no_grad()
def layout_table(folder: Path, prompts: int, layouts: int) -> dict[tuple[str, str], dict[str, float]]:
    """Per (split, kind): the fractions of sampled layouts with the right count, overlapping, close, relation
    right (of those with a relation), and the mean smallest half side."""
    _, _, text_encoder, tokenizer, layout = load_pipeline_parts(folder)
    counts: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for split in ("train", "heldout"):
        scenes, captions = zip(*(scene_caption(99, split, i) for i in range(prompts)))
        context = text_encoder(tokenizer(list(captions)))
        slots = layout.read_slots(context)
        for v in range(layouts):
            generators = [torch.Generator().manual_seed(1000 * v + i) for i in range(prompts)]
            boxes = layout.sample_boxes(slots, context, layout_noise(generators, layout.config.slots))
            overlap, close = (box_overlap(normalize_boxes(boxes), boxes[..., 0], gap) > 0 for gap in (0.0, GAP))
            for scene, b, overlaps, near in zip(scenes, boxes, overlap.tolist(), close.tolist()):
                row = counts[(split, scene.prompt.kind)]
                n = len(scene.prompt.objects)
                present = b[b[:, 0] > 0]
                row["layouts"] += 1
                row["count right"] += int(len(present) == n)
                row["overlap"] += int(overlaps)
                row["close"] += int(near)
                row["smallest half side"] += float(present[:, 3].min()) if len(present) else 0.0
                if scene.prompt.relation and len(present) >= 2:
                    row["with relation"] += 1
                    row["relation right"] += int(relation_holds(scene.prompt.relation, tuple(b[0, 1:3].tolist()),
                                                                tuple(b[1, 1:3].tolist())))
    for row in counts.values():
        for key in ("count right", "overlap", "close", "smallest half side"):
            row[key] /= row["layouts"]
        if row["with relation"]:
            row["relation right"] /= row["with relation"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(BUILTIN_DIR), help="pipeline folder with a layout/ part")
    parser.add_argument("--prompts", type=int, default=400, help="prompts per split")
    parser.add_argument("--layouts", type=int, default=4, help="sampled layouts per prompt")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = layout_table(Path(args.model), args.prompts, args.layouts)
    print("| split | kind | layouts | count right | overlap | close (< GAP) | relation right | smallest half side |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (split, kind), row in sorted(table.items()):
        relation = f"{row['relation right']:.1%}" if row["with relation"] else "-"
        print(f"| {split} | {kind} | {int(row['layouts'])} | {row['count right']:.1%} | {row['overlap']:.1%} | "
              f"{row['close']:.1%} | {relation} | {row['smallest half side']:.3f} |")


if __name__ == "__main__":
    main()
