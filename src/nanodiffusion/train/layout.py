"""Stage 3 of the built-in model: the layout stage's slot reader and box flow model, trained alone.

Stage 2 trains the whole layout stage together with the UNet, 32 scenes a step. That is not enough for the box
flow model, which must learn a joint distribution of boxes that never overlap and that honour the relation: after
stage 2 about half of its sampled two-object layouts overlapped. Boxes are four numbers per object, so here the
flow model (`LayoutModel.flow_modules`) trains alone on hundreds of layouts a step, and on several layouts of every
caption (the scene's own and fresh draws of its prompt): with one layout per caption its 3- and 4-object layouts
overlapped in about one sample in six. Its loss adds SEPARATION times the overlap of the layout it predicts
(boxes closer than the training scenes' GAP; models/layout.py flow_loss): sampled boxes closer than any training
scene's were drawn as one merged object (docs/builtin.md, b10).

The slot reader and its heads are trained here again from fresh weights, on the frozen text states, by their
cross-entropy and the flow loss (the flow model learns from the slot features which object is which). Stage 2's
reader, trained with the UNet's loss flowing into it through the map and on a text encoder still moving, named the
training compositions right but an unseen pair unsteadily: b11's gave "two green squares" p(green) = 0.31-0.34 and
the rest to "any colour", and the UNet drew those squares teal (docs/builtin.md, b13). The slot classes mean the
same as in stage 2, so the map projection and the UNet that reads the map stay as stage 2 left them.

    python -m nanodiffusion.train.layout runs/diffusion/model --output runs/layout
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from torch import nn

from ..data.shapes import GAP, realize, scene_boxes, scene_caption, scene_labels
from .args import add_common_arguments, config_from_args
from .builtin import LAYOUT_RECIPE, guidance_settings, load_pipeline_parts, write_pipeline_folder
from .data import batch_indices
from .loop import TrainConfig, config_dict, train

LAYOUTS_PER_CAPTION = 8
SEPARATION = 10.0   # weight of the predicted boxes' overlap in the loss (models/layout.py flow_loss)
SEPARATION_GAP = GAP   # boxes closer than the training scenes ever are count as overlapping


class LayoutStageObjective(nn.Module):
    """The slot reader's cross-entropy (from fresh weights) plus the box flow model's rectified-flow loss on its slot
    features, both on precomputed text states."""

    def __init__(self, layout: nn.Module):
        super().__init__()
        self.layout = layout.requires_grad_(False)
        layout.reset_reader()
        for p in layout.reader_parameters():
            p.requires_grad_(True)
        for module in layout.flow_modules():
            module.requires_grad_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        slots = self.layout.read_slots(batch["context"])
        flow = self.layout.flow_loss(batch["boxes"], slots, batch["context"], SEPARATION, SEPARATION_GAP)
        names = self.layout.slot_loss(slots, batch["labels"])
        return (flow + names).mean(), {"flow": flow.mean().detach(), "slots": names.mean().detach()}


@torch.no_grad()
def encode_texts(text_encoder: nn.Module, ids: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Text states of every caption, computed once (the text encoder stays frozen in this stage)."""
    return torch.cat([text_encoder(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])


def caption_layouts(seed: int, size: int, count: int = LAYOUTS_PER_CAPTION) -> torch.Tensor:
    """Boxes (count, size, slots, 4) of the training scenes' prompts: each scene's own layout, then count - 1 fresh
    layouts of the same prompt (data/shapes.py draws them by the same rule)."""
    scenes = [scene_caption(seed, "train", i)[0] for i in range(size)]

    def layout(v: int, i: int) -> list[tuple[float, float, float, float]]:
        scene = scenes[i]
        fresh = random.Random(f"layouts:{seed}:{i}:{v}")
        return scene_boxes(scene if v == 0 else realize(scene.prompt, fresh, "train"))

    return torch.tensor([[layout(v, i) for i in range(size)] for v in range(count)])


def train_layout(config: TrainConfig, model_folder: Path, dataset_size: int = 20_000) -> Path:
    """Train the slot reader (afresh) and the box flow model of a stage-2 pipeline folder; writes output/model (the
    folder with its layout stage replaced)."""
    unet, vae, text_encoder, tokenizer, layout = load_pipeline_parts(model_folder)
    scheduler = json.loads((Path(model_folder) / "scheduler" / "scheduler_config.json").read_text())
    scenes = [scene_caption(config.seed, "train", i) for i in range(dataset_size)]
    context = encode_texts(text_encoder, tokenizer([text for _, text in scenes]))
    labels = torch.tensor([scene_labels(scene, layout.config.slots) for scene, _ in scenes])
    boxes = caption_layouts(config.seed, dataset_size)

    def batches(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        i = batch_indices(dataset_size, config.batch_size, config.seed, step, micro, rank)
        v = batch_indices(len(boxes), config.batch_size, config.seed + 1, step, micro, rank)
        return {"boxes": boxes[v, i], "labels": labels[i], "context": context[i]}

    def finish(objective: nn.Module, output: Path) -> None:
        write_pipeline_folder(output / "model", unet, vae, text_encoder, tokenizer, scheduler,
                              name=Path(model_folder).parent.name, layout=objective.layout,
                              **guidance_settings(model_folder))
        (output / "train_config.json").write_text(json.dumps(config_dict(config), indent=2))

    train(LayoutStageObjective(layout), batches, config, finish=finish)
    return Path(config.output) / "model"


def main(argv: list[str] | None = None) -> None:
    """`nanodiff train layout MODEL ...` / `python -m nanodiffusion.train.layout MODEL ...`."""
    parser = argparse.ArgumentParser(prog="nanodiff train layout",
                                     description="train the layout stage's slot reader and box flow model of a stage-2 model")
    parser.add_argument("model", help="pipeline folder written by `nanodiff train diffusion` (RUN/model)")
    add_common_arguments(parser, "runs/layout", LAYOUT_RECIPE)
    args = parser.parse_args(argv)
    print(train_layout(config_from_args(args), Path(args.model), dataset_size=args.dataset_size))


if __name__ == "__main__":
    main()
