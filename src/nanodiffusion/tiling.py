"""Seamless tiling: every convolution pads circularly, so the image's left edge continues its right edge and its top
continues its bottom (the popular web UI's "Tiling" option)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def circular_padding(models: list[nn.Module | None]) -> Iterator[None]:
    """Within the block, the padded Conv2d layers of `models` pad circularly (wrap around) instead of with zeros."""
    convs = [m for model in models if model is not None for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and any(m._reversed_padding_repeated_twice)]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
