"""Learning-rate schedule: linear warm-up, then cosine decay (Loshchilov & Hutter 2017, SGDR)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """lr(step) / lr: (step+1)/warmup while warming up, then min + (1-min) * (1 + cos(pi * progress)) / 2."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
