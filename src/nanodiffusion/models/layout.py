"""The layout model: text -> where each object goes -> a map of object slots the UNet draws from.

A two-stage text-to-image design after LMD and GLIGEN (Lian et al. 2023; Li et al. 2023), learned end to end
from the training scenes (no hand-written parsing, nothing drawn by code):
  1. slots: K learned queries read the text encoder's states through transformer blocks (a DETR-style decoder,
     Carion et al. 2020); slot k becomes "the k-th object the prompt names" (its colour, shape, role);
  2. boxes: a small rectified-flow model (Liu et al. 2023) samples every slot's box b_k = (presence, cx, cy,
     half side) given the slots and the text, so layouts vary with the seed as the training scenes do;
  3. paint: each present slot's attributes -- the slot heads' class distributions (colour, shape), trained on
     the scenes' labels -- embedded linearly to `map_channels`, fill a soft square footprint of its box on the
     latent grid. The UNet takes [z_t, map] as its input channels (as SD's inpainting UNet takes extra
     channels), so shape, colour and edges are drawn by denoising; the map says where each slot is and what it
     is. Being a sum of a colour embedding and a shape embedding, the map of a colour-shape pair never seen in
     training is made of parts the UNet has seen (a map of raw slot features let the other object's colour leak
     into an unseen pair: docs/builtin.md).
Classifier-free guidance drops the map together with the text (the unconditional branch sees zeros).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import BasicTransformerBlock
from .resnet import TimestepEmbedding, timestep_embedding

# Boxes in image fractions (presence in {0, 1}, centre x, centre y, half side) <-> the unit-scale vectors the
# flow model works on: presence -> +-1, centres -> [-1, 1], half sides around the shapes' typical size.
SIZE_MEAN, SIZE_SCALE = 0.18, 8.0
READER = ("slot_queries", "slot_blocks", "slot_norm", "slot_heads")   # the slot reader and its heads
FLOW_TIMESTEPS = 1000  # the network's timestep is 1000 s for flow time s in [0, 1] (diffusers' FlowMatch convention)


@dataclass
class LayoutConfig:
    """Sizes of the layout model (config.json of a model folder's layout/ part)."""

    slots: int = 4
    context_dim: int = 128
    dim: int = 128
    heads: int = 4
    slot_layers: int = 2
    box_layers: int = 3
    map_channels: int = 16
    slot_classes: list[int] = dataclasses.field(default_factory=lambda: [7, 4])  # per attribute: classes
    sharpness: float = 100.0  # footprint edge steepness, per image width (10-90% rise over 0.7 latent cells of 16)
    sample_steps: int = 24

    @classmethod
    def from_dict(cls, d: dict) -> LayoutConfig:
        """Config from a config.json dict; keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {"_class_name": "LayoutModel", **dataclasses.asdict(self)}


def normalize_boxes(boxes: Tensor) -> Tensor:
    """(presence, cx, cy, half side) in image fractions -> the flow model's unit-scale vectors."""
    present, cx, cy, size = boxes.unbind(-1)
    return torch.stack([2 * present - 1, (2 * cx - 1) * present, (2 * cy - 1) * present,
                        (size - SIZE_MEAN) * SIZE_SCALE * present], -1)


def denormalize_boxes(v: Tensor) -> Tensor:
    """Inverse of normalize_boxes; a slot is present when its presence coordinate is positive."""
    present = (v[..., 0] > 0).to(v.dtype)
    return torch.stack([present, (v[..., 1] + 1) / 2 * present, (v[..., 2] + 1) / 2 * present,
                        (v[..., 3] / SIZE_SCALE + SIZE_MEAN).clamp(min=0.0) * present], -1)


class LayoutModel(nn.Module):
    """Slot reader, box flow model and painter (see the module docstring)."""

    def __init__(self, config: LayoutConfig):
        super().__init__()
        self.config = config
        dim, heads = config.dim, config.heads
        self.slot_queries = nn.Parameter(torch.randn(config.slots, dim) * 0.02)
        self.slot_blocks = nn.ModuleList(BasicTransformerBlock(dim, heads, dim // heads, config.context_dim)
                                         for _ in range(config.slot_layers))
        self.slot_norm = nn.LayerNorm(dim)
        self.box_in = nn.Linear(4, dim)
        self.time_embedding = TimestepEmbedding(dim, dim)
        self.box_blocks = nn.ModuleList(BasicTransformerBlock(dim, heads, dim // heads, config.context_dim)
                                        for _ in range(config.box_layers))
        self.box_norm = nn.LayerNorm(dim)
        self.box_out = nn.Linear(dim, 4)
        self.slot_heads = nn.ModuleList(nn.Linear(dim, n) for n in config.slot_classes)
        self.map_proj = nn.Linear(sum(config.slot_classes), config.map_channels)
        nn.init.zeros_(self.box_out.weight)
        nn.init.zeros_(self.box_out.bias)

    def flow_modules(self) -> list[nn.Module]:
        """The box flow model's own layers (stage 3, train/layout.py, trains them)."""
        return [self.box_in, self.time_embedding, self.box_blocks, self.box_norm, self.box_out]

    def reader_parameters(self) -> list[nn.Parameter]:
        """The slot reader and its heads (stage 3 trains them afresh, train/layout.py)."""
        return [p for name, p in self.named_parameters() if name.split(".")[0] in READER]

    @torch.no_grad()
    def reset_reader(self) -> None:
        """Re-draw the slot reader's and heads' initial weights (the map projection and flow model are kept)."""
        for mine, fresh in zip(self.reader_parameters(), LayoutModel(self.config).reader_parameters()):
            mine.copy_(fresh)

    def read_slots(self, context: Tensor) -> Tensor:
        """Slot features (B, K, dim): the learned queries cross-attending to the text states (B, L, context_dim)."""
        h = self.slot_queries.to(context.dtype).expand(len(context), -1, -1)
        for block in self.slot_blocks:
            h = block(h, context)
        return self.slot_norm(h)

    def attributes(self, slots: Tensor) -> Tensor:
        """Each slot's attribute distributions, softmax(head_i(slot)) for every head, concatenated (B, K, classes)."""
        return torch.cat([head(slots).float().softmax(-1) for head in self.slot_heads], -1).to(slots.dtype)

    def slot_loss(self, slots: Tensor, labels: Tensor) -> Tensor:
        """Per-image cross-entropy of each slot's attributes (labels (B, K, attributes), -1 where unknown): an
        auxiliary training signal that makes slot k carry the k-th object's words (used in training only)."""
        losses = [F.cross_entropy(head(slots).flatten(0, 1).float(), labels[..., i].flatten(), ignore_index=-1,
                                  reduction="none").view(labels.shape[:2]) for i, head in enumerate(self.slot_heads)]
        return torch.stack(losses).sum(0).sum(1) / (labels >= 0).sum((1, 2)).clamp(min=1)

    def velocity(self, boxes: Tensor, t: Tensor, slots: Tensor, context: Tensor) -> Tensor:
        """The flow model u(b_s, s) ~ eps - b_0 (Liu et al. 2023), at network timestep t = 1000 s."""
        temb = self.time_embedding(timestep_embedding(t.reshape(-1).expand(len(boxes)), self.config.dim))
        h = self.box_in(boxes) + slots + temb[:, None]
        for block in self.box_blocks:
            h = block(h, context)
        return self.box_out(self.box_norm(h))

    def flow_loss(self, boxes: Tensor, slots: Tensor, context: Tensor, separation: float = 0.0,
                  gap: float = 0.03) -> Tensor:
        """Per-image rectified-flow loss ||u(b_s, s) - (eps - b_0)||^2 at logit-normal s (Esser et al. 2024,
        eq. 19); with `separation` > 0, plus that weight times the overlap (boxes closer than `gap`) of the boxes
        the model predicts, b^_0 = b_s - s u, at s < 1/2 (where b^_0 is close to one layout, not an average)."""
        b0 = normalize_boxes(boxes)
        s = torch.sigmoid(torch.randn(len(b0), 1, 1, device=b0.device))
        noise = torch.randn_like(b0)
        b_s = (1 - s) * b0 + s * noise
        u = self.velocity(b_s, FLOW_TIMESTEPS * s, slots, context).float()
        loss = (u - (noise - b0)).pow(2).flatten(1).mean(1)
        if separation > 0:
            loss = loss + separation * (s.flatten() < 0.5) * box_overlap(b_s - s * u, boxes[..., 0], gap)
        return loss

    @torch.no_grad()
    def sample_boxes(self, slots: Tensor, context: Tensor, noise: Tensor) -> Tensor:
        """Boxes (B, K, 4) in image fractions: Euler steps of the flow ODE from b_1 = noise to b_0."""
        s = torch.linspace(1.0, 0.0, self.config.sample_steps + 1)
        b = noise.to(slots.dtype)
        for s_now, s_next in zip(s[:-1], s[1:]):
            b = b + (s_next - s_now) * self.velocity(b, FLOW_TIMESTEPS * s_now.to(b), slots, context)
        return denormalize_boxes(b.float())

    def paint(self, boxes: Tensor, slots: Tensor, height: int, width: int) -> Tensor:
        """Map (B, map_channels, height, width): every present slot's embedded attributes on its box's footprint,
        a soft square w = sigmoid(sharpness (half side - max(|x - cx|, |y - cy|))). Where footprints overlap (never
        in the training scenes, sometimes in sampled layouts) the weights are divided by max(1, sum w), so the map
        stays a convex mix of slot features instead of growing past anything the UNet was trained on."""
        present, cx, cy, size = (v[..., None, None] for v in boxes.float().unbind(-1))
        ys = (torch.arange(height, device=boxes.device) + 0.5) / height
        xs = (torch.arange(width, device=boxes.device) + 0.5) / width
        distance = torch.maximum((xs - cx).abs(), (ys[:, None] - cy).abs())
        footprint = present * torch.sigmoid(self.config.sharpness * (size - distance))
        footprint = footprint / footprint.sum(1, keepdim=True).clamp(min=1.0)
        return torch.einsum("bkhw,bkc->bchw", footprint.to(slots.dtype), self.map_proj(self.attributes(slots)))

    @torch.no_grad()
    def forward(self, context: Tensor, noise: Tensor, height: int, width: int) -> Tensor:
        """Text states -> slot map: read the slots, sample their boxes from `noise` (B, K, 4), paint them."""
        slots = self.read_slots(context)
        return self.paint(self.sample_boxes(slots, context, noise), slots, height, width)


def box_overlap(v: Tensor, present: Tensor, margin: float = 0.03) -> Tensor:
    """Per image, the summed overlap of every pair of present boxes (B, K, 4 unit-scale vectors; presence given):
    relu(half side_i + half side_j + margin - Chebyshev distance of the centres), in image fractions."""
    cx, cy, size = (v[..., 1] + 1) / 2, (v[..., 2] + 1) / 2, v[..., 3] / SIZE_SCALE + SIZE_MEAN
    distance = torch.maximum((cx[:, :, None] - cx[:, None]).abs(), (cy[:, :, None] - cy[:, None]).abs())
    overlap = (size[:, :, None] + size[:, None] + margin - distance).relu()
    pairs = present[:, :, None] * present[:, None] * torch.ones_like(overlap).triu(1)
    return (overlap * pairs).sum((1, 2))


def layout_noise(generators: list[torch.Generator], slots: int) -> Tensor:
    """The flow model's starting noise, one (K, 4) draw per image from its own seeded generator."""
    return torch.stack([torch.randn(slots, 4, generator=g) for g in generators])
