"""Cross-attention maps softmax(Q K^T / sqrt(d)) of a UNet, captured with forward hooks on its cross-attention
layers ("attn2") and recomputed from their to_q / to_k (Prompt-to-Prompt, Hertz et al. 2022; DAAM, Tang et al.
2023): which pixels each prompt token is read by."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionMaps:
    """While active (a context manager), every cross-attention call of `unet` appends its probabilities,
    averaged over heads, as (B, queries, tokens) to `calls`; `token_maps` averages them into per-token images."""

    def __init__(self, unet: nn.Module, suffix: str = "attn2"):
        self.layers = [module for name, module in unet.named_modules() if name.endswith(suffix)]
        self.calls: list[torch.Tensor] = []
        self.handles: list = []

    def __enter__(self) -> "AttentionMaps":
        self.handles = [layer.register_forward_hook(self.record, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def record(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        b, n, _ = x.shape
        q = module.to_q(x).view(b, n, module.heads, -1).transpose(1, 2).float()
        k = module.to_k(context).view(b, context.shape[1], module.heads, -1).transpose(1, 2).float()
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        self.calls.append(probs.mean(1))

    def clear(self) -> None:
        self.calls = []

    def token_maps(self, height: int, width: int, rows: slice = slice(None)) -> torch.Tensor:
        """(B, tokens, height, width): every recorded call's map for batch rows `rows`, upsampled to the latent
        size and averaged over layers and calls."""
        maps = []
        for probs in self.calls:
            probs = probs[rows]
            h = round(math.sqrt(probs.shape[1] * height / width))
            grid = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, probs.shape[1] // h)
            maps.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0)
