"""Training data: the synthetic shapes scenes or a user's image folder, drawn by step.

Every batch is a pure function of (seed, step, micro-batch, process), so a resumed run sees exactly
the batches an uninterrupted one would, and every DDP process sees different ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset


def open_dataset(data: str | Path | None, size: int = 64, length: int = 20_000, seed: int = 0,
                 codec: bool = False) -> Dataset:
    """The shapes scenes (data None or "shapes"; codec: half of them recoloured, the autoencoder's data) or an
    image folder; a bad folder fails here, before training."""
    if data is None or str(data) == "shapes":
        from ..data.shapes import CodecDataset, ShapesDataset

        return CodecDataset(length, seed, size) if codec else ShapesDataset(length, seed, split="train", size=size)
    from ..data.folder import ImageFolderDataset

    return ImageFolderDataset(data, size)  # checks the folder now: missing, empty or unreadable -> clear error


def batch_indices(n: int, batch_size: int, seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Tensor:
    """Indices of one micro-batch, drawn uniformly with a generator seeded by (seed, step, micro, rank)."""
    generator = torch.Generator().manual_seed(hash((seed, step, micro, rank)) % 2**63)
    return torch.randint(n, (batch_size,), generator=generator)


def collate(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Stack the images [B, 3, H, W] in [-1, 1] and list the captions of the given indices."""
    items = [dataset[int(i)] for i in indices]
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items]
