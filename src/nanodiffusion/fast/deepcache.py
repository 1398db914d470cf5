"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): the deep levels of the UNet
change little from one step to the next, so their output is computed at every N-th network call and reused in
between, where only the top level runs (the high-resolution down and up blocks; UNet2DConditionModel.shallow).
This is the paper's uniform 1:N schedule with the cache at the top level's skip branch. A call whose batch
differs from the cached one (e.g. once guidance is dropped) runs the whole UNet and restarts the cycle."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import NanoDiffusionError


class DeepCache:
    """The cached deep features (the input of the UNet's last up block) and the 1:N schedule."""

    def __init__(self, interval: int):
        self.interval = interval
        self.features: torch.Tensor | None = None   # set by the UNet on every full call
        self.since_full = 0
        self.full_calls = 0
        self.shallow_calls = 0

    def reusable(self, sample: torch.Tensor) -> bool:
        """Whether this call may run the top level only: fewer than interval - 1 reuses since the last full
        call, and cached features for the same batch."""
        reuse = (self.features is not None and self.features.shape[0] == sample.shape[0]
                 and self.since_full < self.interval - 1)
        self.since_full = self.since_full + 1 if reuse else 0
        self.shallow_calls += reuse
        self.full_calls += not reuse
        return reuse


@contextmanager
def deep_cache(unet: nn.Module, interval: int):
    """Let `unet` reuse its deep features for interval - 1 calls out of every `interval` while in the block."""
    if len(unet.config.block_out_channels) < 2:
        raise NanoDiffusionError("DeepCache needs a UNet with at least two levels; turn --deepcache off")
    unet.deep_cache = DeepCache(interval)
    try:
        yield unet.deep_cache
    finally:
        del unet.deep_cache
