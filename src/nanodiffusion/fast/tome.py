"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

Before each self-attention of the top-resolution spatial transformers, r = ratio * N of the N tokens are merged
into similar ones by bipartite soft matching (Bolya et al. 2023, ToMe §3): one token per 2x2 cell, picked at
random, is a destination; every other token (a source) finds its most cosine-similar destination; the r sources
with the most similar matches are averaged into their destinations. Attention runs on the N - r tokens left,
and its output is unmerged: every merged source takes its destination's output (ToMe for SD §3.2-3.4).

The model stays as it is: token_merging installs forward hooks on the top level's spatial transformers (their
feature map's size), transformer blocks (the matching from the block's input tokens) and self-attentions (merge
their input, unmerge their output), removed when the block ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn

from ..models.attention import Transformer2DModel

TokenMerging = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]  # (merge, unmerge) of a token set


def bipartite_merging(x: Tensor, size: torch.Size, ratio: float, generator: torch.Generator) -> TokenMerging:
    """(merge, unmerge) for tokens x [B, N, C] of an H x W map (ToMe for SD's random 2x2 destinations)."""
    b, n, _ = x.shape
    h, w = size
    cells_h, cells_w = h // 2, w // 2
    pick = torch.randint(4, (cells_h, cells_w, 1), generator=generator)
    is_src = torch.ones(cells_h, cells_w, 4, dtype=torch.int64).scatter_(2, pick, 0)
    grid = torch.ones(h, w, dtype=torch.int64)   # rows / columns outside the 2x2 cells stay sources
    grid[:2 * cells_h, :2 * cells_w] = is_src.view(cells_h, cells_w, 2, 2).transpose(1, 2).reshape(
        2 * cells_h, 2 * cells_w)
    order = grid.flatten().argsort(stable=True)   # destinations first
    dst_idx, src_idx = order[:cells_h * cells_w], order[cells_h * cells_w:]
    r = min(int(n * ratio), len(src_idx))

    metric = x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)
    best, best_dst = similarity.max(dim=-1)                      # [B, sources]
    ranked = best.argsort(dim=-1, descending=True)
    merged, kept = ranked[:, :r], ranked[:, r:]                  # positions among the sources
    merged_dst = best_dst.gather(1, merged)                      # their destinations (positions among dst)

    def rows(t: Tensor, idx: Tensor) -> Tensor:
        """t[b, idx[b, i]] for every batch row b."""
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    def merge(t: Tensor) -> Tensor:
        """[kept sources, destinations (each the mean of itself and the sources merged into it)]."""
        src, dst = t[:, src_idx], t[:, dst_idx]
        dst = dst.scatter_reduce(1, merged_dst[..., None].expand(-1, -1, t.shape[-1]), rows(src, merged),
                                 reduce="mean")
        return torch.cat([rows(src, kept), dst], dim=1)

    def unmerge(t: Tensor) -> Tensor:
        """Back to N tokens: kept sources and destinations in place, merged sources copy their destination."""
        kept_out, dst = t[:, :kept.shape[1]], t[:, kept.shape[1]:]
        out = t.new_empty(b, n, t.shape[-1])
        out[:, dst_idx] = dst
        for positions, values in ((src_idx[kept], kept_out), (src_idx[merged], rows(dst, merged_dst))):
            out.scatter_(1, positions[..., None].expand(-1, -1, t.shape[-1]), values)
        return out

    return merge, unmerge


def top_level_transformers(unet: nn.Module) -> list[Transformer2DModel]:
    """The spatial transformers of the highest-resolution level that has any (ToMe for SD merges only there)."""
    levels = len(unet.down_blocks)
    for level, block in enumerate(unet.down_blocks):
        found = [*block.attentions, *unet.up_blocks[levels - 1 - level].attentions]
        if found:
            return found
    return []


class MergingHooks:
    """The forward hooks token_merging installs, and what they pass along: the size of the feature map the current
    spatial transformer runs on, and the current block's (merge, unmerge)."""

    def __init__(self, ratio: float, generator: torch.Generator):
        self.ratio, self.generator = ratio, generator
        self.size: torch.Size | None = None
        self.merging: TokenMerging | None = None

    def remember_size(self, transformer: nn.Module, args: tuple) -> None:
        """Pre-hook of a spatial transformer: its input's (H, W)."""
        self.size = args[0].shape[-2:]

    def match(self, block: nn.Module, args: tuple) -> None:
        """Pre-hook of a transformer block: the bipartite matching of its input tokens."""
        self.merging = bipartite_merging(args[0], self.size, self.ratio, self.generator)

    def merge(self, attention: nn.Module, args: tuple) -> tuple:
        """Pre-hook of a self-attention: its input tokens merged."""
        return (self.merging[0](args[0]), *args[1:])

    def unmerge(self, attention: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook of a self-attention: its output back on every token."""
        return self.merging[1](output)


@contextmanager
def token_merging(unet: nn.Module, ratio: float, seed: int = 0):
    """Merge `ratio` of the tokens before the top level's self-attentions while in the block; the random
    destinations come from a generator seeded with `seed`, so a generation stays reproducible."""
    hooks = MergingHooks(ratio, torch.Generator().manual_seed(seed))
    transformers = top_level_transformers(unet)
    handles = []
    for module in transformers:
        handles.append(module.register_forward_pre_hook(hooks.remember_size))
        for block in module.transformer_blocks:
            handles += [block.register_forward_pre_hook(hooks.match),   # the attention's own hooks see merged tokens
                        block.attn1.register_forward_pre_hook(hooks.merge, prepend=True),
                        block.attn1.register_forward_hook(hooks.unmerge)]
    try:
        yield transformers
    finally:
        for handle in handles:
            handle.remove()
