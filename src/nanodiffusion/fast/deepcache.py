"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): the deep levels of the UNet
change little from one step to the next, so their output is computed at every N-th network call and reused in
between, where only the top level runs (the high-resolution down and up blocks).
This is the paper's uniform 1:N schedule with the cache at the top level's skip branch. A call whose batch
differs from the cached one (e.g. once guidance is dropped) runs the whole UNet and restarts the cycle.

DeepCache wraps a UNet: calling it runs the UNet's steps (UNet2DConditionModel.embed / encode / up levels / head)
in full or in part. deep_cache(unet, n) routes the UNet's own calls through the wrapper while in the block."""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn

from ..errors import NanoDiffusionError


class DeepCache:
    """A UNet called with a 1:N schedule: every N-th call runs in full and keeps the input of its last up block
    (`features`), the calls in between run the top level on those features (partial)."""

    def __init__(self, unet: nn.Module, interval: int):
        if len(unet.config.block_out_channels) < 2:
            raise NanoDiffusionError("DeepCache needs a UNet with at least two levels; turn --deepcache off")
        self.unet, self.interval = unet, interval
        self.features: Tensor | None = None   # the input of the last up block at the last full call
        self.since_full = 0
        self.full_calls = 0
        self.shallow_calls = 0

    def reusable(self, sample: Tensor) -> bool:
        """Whether this call may run the top level only: fewer than interval - 1 reuses since the last full
        call, and cached features for the same batch."""
        reuse = (self.features is not None and self.features.shape[0] == sample.shape[0]
                 and self.since_full < self.interval - 1)
        self.since_full = self.since_full + 1 if reuse else 0
        self.shallow_calls += reuse
        self.full_calls += not reuse
        return reuse

    def __call__(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor, *,
                 down_block_additional_residuals: list[Tensor] | None = None,
                 mid_block_additional_residual: Tensor | None = None, **embed_inputs: Tensor | None) -> Tensor:
        """The UNet's prediction, as UNet2DConditionModel.forward takes its arguments."""
        unet, context = self.unet, encoder_hidden_states
        emb = unet.embed(sample, timestep, **embed_inputs)
        if self.reusable(sample):
            return self.partial(sample, emb, context)
        h, skips = unet.encode(sample, emb, context, down_block_additional_residuals, mid_block_additional_residual)
        for block in unet.up_blocks[:-1]:
            h = block(h, emb, context, skips)
        self.features = h
        return unet.head(unet.up_blocks[-1](h, emb, context, skips))

    def partial(self, sample: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        """DeepCache's partial step (§3.2): only the top level runs (conv_in, the first down block, the last up
        block); the cached features stand in for everything below it. The first down block's downsampled output
        feeds only the deep levels (it is dropped)."""
        unet = self.unet
        h = unet.conv_in(sample)
        _, block_skips = unet.down_blocks[0](h, emb, context)
        return unet.head(unet.up_blocks[-1](self.features, emb, context, [h, *block_skips[:-1]]))


@contextmanager
def deep_cache(unet: nn.Module, interval: int):
    """Let `unet` reuse its deep features for interval - 1 calls out of every `interval` while in the block: its
    calls (hooks included) run through a DeepCache wrapper, which the block yields."""
    cache = DeepCache(unet, interval)
    unet.forward = cache
    try:
        yield cache
    finally:
        del unet.forward
