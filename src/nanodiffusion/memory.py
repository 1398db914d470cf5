"""Will a model fit: the memory its weights take at the chosen precision against what this machine has free, checked
before the networks are built, so that a model too big (SD 3.5 Large with T5 on a 24 GB machine) fails with one line
naming what it needs instead of being killed by the kernel half-way through loading.

Weights computed in bfloat16 are held once in bfloat16 (2 bytes each: precision.py converts or packs them while
loading); in float32 they take their storage dtype's size (storage.py). Activations come on top and are not counted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import NanoDiffusionError

GB = 2**30
PART_NAMES = {"unet": "UNet", "transformer": "MMDiT", "vae": "VAE", "text_encoder": "CLIP text encoder",
              "text_encoder_2": "second CLIP text encoder", "text_encoder_3": "T5 encoder"}


def available_memory() -> int | None:
    """Bytes this machine can give a new model: MemAvailable + SwapFree of /proc/meminfo (None where unknown)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return sum(int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def weights_bytes(parts: dict[str, dict[str, Tensor]], compute: torch.dtype, storage: torch.dtype
                  ) -> dict[str, int]:
    """Bytes each part's weights take once loaded: floating-point tensors at the compute dtype's size in bfloat16,
    else at the storage dtype's; other tensors as they are."""
    size = (compute if compute == torch.bfloat16 else storage).itemsize
    return {part: sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in sd.values())
            for part, sd in parts.items()}


def check_memory(parts: dict[str, dict[str, Tensor]], compute: torch.dtype, storage: torch.dtype) -> None:
    """Raise one clear line when the weights need more memory than is free (the parts' sizes, and for SD3 the
    size without its optional T5 encoder)."""
    need = weights_bytes(parts, compute, storage)
    free = available_memory()
    total = sum(need.values())
    if free is None or total <= free:
        return
    sizes = ", ".join(f"{PART_NAMES.get(part, part)} {n / GB:.1f} GB" for part, n in need.items() if n >= GB / 10)
    ways = ["free memory", "use a machine with more"]
    if "text_encoder_3" in need:
        ways.insert(0, f"load it without T5 (--no-t5, t5=False: {(total - need['text_encoder_3']) / GB:.1f} GB)")
    if compute != torch.bfloat16:
        halved = sum(weights_bytes(parts, torch.bfloat16, storage).values())
        ways.insert(0, f"compute in bfloat16 (--precision bfloat16: {halved / GB:.1f} GB)")
    raise NanoDiffusionError(f"the model's weights need about {total / GB:.1f} GB in "
                             f"{str(compute if compute == torch.bfloat16 else storage).removeprefix('torch.')} "
                             f"({sizes}) but this machine has {free / GB:.1f} GB free: {', or '.join(ways)}")
