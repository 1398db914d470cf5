"""Does a layout-mask ControlNet control where the built-in model draws things? One command, one table.

For N prompts of each split (held-out compositions and/or training-distribution prompts, all their kinds),
generate with the same seed three times and score every image with the evaluator (evaluate.py, GenEval-style):
  * no control: the base model alone;
  * layout mask: the ControlNet fed the layout mask (data/conditions.py) of another random scene realising the
    same prompt (a different layout from the one any seed would give, but one the prompt allows);
  * swapped mask: the mask of the same scene with its first two objects trading places (data/conditions.swapped),
    so its relation is the inverse of the prompt's while every shape stays as drawn.
    Scored against the prompt, position accuracy should fall; scored against the mask's (inverted) relation,
    it should rise: the model follows the mask, not the words.
Besides the evaluator's categories, "mask IoU" is the intersection over union of the image's coloured pixels
(the evaluator's chroma threshold) with the mask's white pixels: how well the drawn silhouettes cover the layout.
Writes the table, the command and an example grid (prompt | control | without | with) to docs/.

    python benchmarks/layout_control.py --base /work/runs/builtin-3200 --controlnet runs/controlnet/run/controlnet
    python benchmarks/layout_control.py --train-steps 2000 --output runs/layout_control   # train first
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from nanodiffusion.controlnet_files import load_controlnet
from nanodiffusion.data.conditions import inverted, layout_mask, prompt_scene, swapped
from nanodiffusion.data.shapes import sample_prompts
from nanodiffusion.evaluate import CATEGORY_NAMES, MIN_CHROMA, chroma, evaluate
from nanodiffusion.images import save_png
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.train.controlnet import CONTROLNET_RECIPE, train_controlnet
from nanodiffusion.train.loop import TrainConfig

CONDITIONS = ("none", "mask", "swapped")
ROWS = (("none", "prompt", "no control"), ("mask", "prompt", "layout mask"),
        ("swapped", "prompt", "swapped mask"), ("swapped", "mask", "swapped mask"),
        ("none", "mask", "no control"))  # (images, scored against, label); the last is the chance level
GRID_COLUMNS = ("prompt", "control", "without", "with control", "swapped control", "with swapped")
TILE = 128


def mask_iou(image: Image.Image, mask: Image.Image) -> float:
    """IoU of the image's coloured pixels (chroma >= the evaluator's MIN_CHROMA) with the mask's white pixels."""
    drawn = chroma(np.asarray(image.convert("RGB").resize(mask.size, Image.Resampling.BOX))) >= MIN_CHROMA
    layout = np.asarray(mask.convert("L")) > 127
    return float((drawn & layout).sum() / max((drawn | layout).sum(), 1))


def generate_split(pipe: Pipeline, steered: Pipeline, split: str, n: int, args: argparse.Namespace) -> dict:
    """Images of n prompts of the split under each condition (same seed per prompt), and their control masks."""
    cases = sample_prompts(n, seed=args.seed, split=split)
    folder = Path(args.output) / "samples" / split
    out = {"cases": cases, "masks": [], "swapped_masks": [], **{c: [] for c in CONDITIONS}}
    started = time.time()
    for i, (prompt, text) in enumerate(cases):
        scene = prompt_scene(prompt, 10_000 + i)
        controls = {"mask": layout_mask(scene), "swapped": layout_mask(swapped(scene))}
        out["masks"].append(controls["mask"])
        out["swapped_masks"].append(controls["swapped"])
        for condition in CONDITIONS:
            image = (pipe if condition == "none" else steered)(
                text, steps=args.sample_steps, sampler=args.sampler, seed=args.seed + i,
                control_image=controls.get(condition), control_scale=args.control_scale)[0]
            out[condition].append(image)
            save_png(image, folder / condition / f"{i:03d}.png")
        save_png(controls["mask"], folder / "masks" / f"{i:03d}.png")
        save_png(controls["swapped"], folder / "swapped_masks" / f"{i:03d}.png")
        if (i + 1) % 8 == 0:
            print(f"{split}: {i + 1}/{n} prompts ({time.time() - started:.0f} s)", flush=True)
    return out


def score_split(data: dict) -> list[dict]:
    """The ROWS of one split: evaluator results and mean mask IoU of each (images, reference) pair."""
    prompts = [prompt for prompt, _ in data["cases"]]
    rows = []
    for images, against, label in ROWS:
        flipped = against == "mask"  # the swapped mask shows the inverted relation
        reference = [inverted(p) for p in prompts] if flipped else prompts
        masks = data["swapped_masks" if flipped else "masks"]
        result = evaluate(data[images], reference)
        result.pop("items")
        iou = sum(mask_iou(image, mask) for image, mask in zip(data[images], masks)) / len(masks)
        rows.append({"control": label, "scored against": "prompt" if not flipped else "mask's relation",
                     **result, "mask_iou": iou})
    return rows


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per (split, control, reference), accuracy per category, overall, mask IoU."""
    kinds = list(dict.fromkeys(k for rows in results.values() for row in rows for k in row["categories"]))
    head = ["split", "control", "scored against", *(CATEGORY_NAMES[k] for k in kinds), "overall", "mask IoU"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for split, rows in results.items():
        for row in rows:
            cells = [f"{row['categories'][k]['accuracy']:.0%}" if k in row["categories"] else "" for k in kinds]
            lines.append(f"| {split} | {row['control']} | {row['scored against']} | " + " | ".join(cells)
                         + f" | {row['overall']:.1%} | {row['mask_iou']:.2f} |")
    return "\n".join(lines)


def label_tile(text: str) -> Image.Image:
    """A white tile with the text wrapped at about 20 characters a line."""
    tile = Image.new("RGB", (TILE, TILE), "white")
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + len(word) >= 20:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    ImageDraw.Draw(tile).multiline_text((6, 6), "\n".join(lines), fill="black")
    return tile


def example_grid(data: dict, count: int) -> Image.Image:
    """Rows of position prompts: prompt | control | without | with | swapped control | with swapped."""
    picks = [i for i, (prompt, _) in enumerate(data["cases"]) if prompt.relation][:count]
    grid = Image.new("RGB", (TILE * len(GRID_COLUMNS), 24 + TILE * len(picks)), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(GRID_COLUMNS):
        draw.text((column * TILE + 6, 6), name, fill="black")
    for row, i in enumerate(picks):
        tiles = [label_tile(data["cases"][i][1]), data["masks"][i], data["none"][i], data["mask"][i],
                 data["swapped_masks"][i], data["swapped"][i]]
        for column, tile in enumerate(tiles):
            tile = tile.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)
            grid.paste(tile, (column * TILE, 24 + row * TILE))
    return grid


def training_summary(run: Path) -> str:
    """One line on how the ControlNet was trained (from its run folder, when there is one)."""
    record, log = run / "controlnet_config.json", run / "log.csv"
    if not record.is_file() or not log.is_file():
        return f"ControlNet: `{run}` (no training record beside it)."
    config = json.loads(record.read_text())
    rows = list(csv.DictReader(log.open()))
    last = rows[-1]
    return (f"ControlNet trained {config['steps']} steps, batch {config['batch_size']}, lr {config['lr']:g}, "
            f"caption dropout {config['uncond_prob']}, on {config['dataset_size']} training scenes, base "
            f"`{config['base']}`: final loss {float(last['loss']):.4f}, {float(last['elapsed_s']) / 60:.0f} min "
            f"on {config['threads'] or 'all'} CPU thread(s) ({float(last['sec_per_step']):.2f} s/step at the end).")


def write_docs(path: Path, grid_path: Path, command: str, results: dict, summary: str, args) -> None:
    """docs/controlnet.md: what was measured, the command, the table, the example grid."""
    lines = [
        "# ControlNet: layout control for the built-in model",
        "",
        "`nanodiff train controlnet` trains a ControlNet (Zhang, Rao & Agrawala 2023; `train/controlnet.py`) for a "
        "frozen model: a copy of its UNet encoder behind zero convolutions, fed a control image. Here the control "
        "image is the scene's **layout mask** (`data/conditions.py`): each object's silhouette in white on black, "
        "no colour, so the mask says where and which shape and the prompt still says which colours.",
        "",
        "```bash",
        "nanodiff train controlnet --base MODEL --output runs/controlnet --steps 2000 --lr 2e-4",
        "nanodiff generate \"a red circle left of a blue square\" --controlnet runs/controlnet/controlnet "
        "--control-image layout.png",
        "```",
        "",
        "## Does it control the layout?",
        "",
        f"For {args.prompts} prompts of each split (every kind of the split, cycled) and one seed each, the same "
        "seed is generated without control, with the layout mask of another random scene realising the prompt, "
        "and with the *swapped* mask (the same scene, its first two objects trading places: the relation inverted, "
        "the shapes unchanged). Every image is scored by the evaluator "
        "(`nanodiff eval`'s `evaluate.py`) against the prompt; the swapped-mask images also against the mask's "
        "inverted relation (and, as the chance level, the no-control images too). *mask IoU*: intersection over "
        "union of the image's coloured pixels with the white pixels of the mask it is compared with. "
        f"Sampler {args.sampler}, {args.sample_steps} steps, the model's default CFG, control scale "
        f"{args.control_scale}.",
        "",
        summary,
        "",
        table(results),
        "",
        f"![prompt, control, without, with control, swapped control, with swapped]({grid_path.name})",
        "",
        "Reproduce:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="base model (default: the built-in model)")
    parser.add_argument("--controlnet", default=None, help="trained ControlNet folder (default: train one)")
    parser.add_argument("--train-steps", type=int, default=CONTROLNET_RECIPE["steps"])
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate when training")
    parser.add_argument("--output", default="runs/layout_control")
    parser.add_argument("--splits", default="heldout,train", help="comma-separated: heldout, train")
    parser.add_argument("--prompts", type=int, default=48, help="prompts per split")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--control-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--examples", type=int, default=6, help="rows of the example grid")
    parser.add_argument("--markdown", default="docs/controlnet.md")
    parser.add_argument("--grid", default="docs/controlnet.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)

    folder = Path(args.controlnet) if args.controlnet else train_controlnet(
        TrainConfig(output=output / "train", threads=args.threads,
                    **{**CONTROLNET_RECIPE, "steps": args.train_steps, "lr": args.lr}), args.base)
    pipe = Pipeline.load(args.base)
    steered = replace(pipe, controlnet=load_controlnet(folder))
    results, grids = {}, []
    for split in args.splits.split(","):
        data = generate_split(pipe, steered, split, args.prompts, args)
        results[split] = score_split(data)
        grids.append(example_grid(data, args.examples // 2 if split == "train" else args.examples - args.examples // 2))
    grid = Image.new("RGB", (grids[0].width, sum(g.height for g in grids)), "white")
    for k, part in enumerate(grids):
        grid.paste(part, (0, sum(g.height for g in grids[:k])))

    text = table(results)
    print(text)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    grid.save(args.grid)
    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    run = folder.parent
    write_docs(Path(args.markdown), Path(args.grid), command, results, training_summary(run), args)


if __name__ == "__main__":
    main()
