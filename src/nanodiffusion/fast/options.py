"""FastOptions: which approximate fast paths a generation uses, the `--fast` preset, and installing them."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NanoDiffusionError
from .deepcache import deep_cache
from .tome import token_merging


@dataclass(frozen=True)
class FastOptions:
    """Approximate fast paths; the defaults are all off (outputs bit-identical to the exact path).

    deepcache   run the whole UNet every N-th call, only its top level in between (1: off; DeepCache)
    tome        share of the top-level tokens merged before each self-attention (0: off; ToMe for SD)
    cfg_cutoff  share of the steps that run classifier-free guidance; the rest run the conditional pass
                alone (1: off; guidance limited to an interval of noise levels)
    """

    deepcache: int = 1
    tome: float = 0.0
    cfg_cutoff: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.deepcache, int) or self.deepcache < 1:
            raise NanoDiffusionError(f"deepcache {self.deepcache!r} is not allowed: use a whole number, "
                                     "1 (off) or more (the full UNet runs every N-th call)")
        if not 0.0 <= self.tome < 1.0:
            raise NanoDiffusionError(f"tome {self.tome} is not allowed: use a share of tokens in [0, 1), e.g. 0.5")
        if not 0.0 <= self.cfg_cutoff <= 1.0:
            raise NanoDiffusionError(f"cfg cutoff {self.cfg_cutoff} is not allowed: use a share of the steps "
                                     "in [0, 1] (1 = guidance on every step)")

    @classmethod
    def preset(cls) -> FastOptions:
        """`--fast`: the combination docs/fast.md measures as worth it."""
        return cls(deepcache=2, cfg_cutoff=0.6)

    @property
    def enabled(self) -> bool:
        """True when any approximation is on."""
        return self != FastOptions()

    def guidance_min_sigma(self, sigmas: torch.Tensor) -> float | None:
        """The noise level at or below which guidance is dropped: the first round(cfg_cutoff * steps) steps
        keep it; the threshold sits halfway between the last guided and the first unguided sigma."""
        steps = len(sigmas) - 1
        guided = round(self.cfg_cutoff * steps)
        if guided >= steps:
            return None
        if guided == 0:
            return math.inf
        return float(sigmas[guided - 1] + sigmas[guided]) / 2


@contextmanager
def fast_paths(unet: nn.Module, options: FastOptions):
    """Install the UNet-side fast paths (DeepCache, token merging) for the duration of one generation."""
    with ExitStack() as stack:
        if options.deepcache > 1:
            stack.enter_context(deep_cache(unet, options.deepcache))
        if options.tome > 0:
            stack.enter_context(token_merging(unet, options.tome))
        yield
