"""Weight storage precision: keep the convolution and linear weights in float16 / bfloat16, compute in float32.

Half-precision storage halves the memory of the weights (for SD 1.5's UNet, 3.4 GB -> 1.7 GB); each layer
upcasts its weight for the duration of its own call (models/resnet.py, PackedWeight.compute_weight), so
activations, accumulation and every other operation stay float32 and the output moves only by the rounding of
the weights to 8 (bfloat16) or 11 (float16) significant bits. Such layers take the plain convolution /
matmul path, not the packed one: a packed float32 copy would bring the memory back (docs/fast.md).
Norms, biases and embeddings (a few percent of the parameters) stay float32.

Checkpoint tensors are usually memory-mapped from their file (safetensors). Every parameter is copied into the
process's own memory in its storage dtype, one tensor at a time, and the file pages it was read from are handed
back to the kernel at once (release_pages): loading holds one copy of the weights plus one tensor (a float32
file loaded into half-precision storage never holds the float32 weights), and the file can change on disk
once it is loaded.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import choice_error
from .models.resnet import PackedWeight

WEIGHT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def weights_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A storage dtype from its name (float32 / bfloat16 / float16, or fp32 / bf16 / fp16); None is float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype) and name in WEIGHT_DTYPES.values():
        return name
    if name not in WEIGHT_DTYPES:
        raise choice_error("weights dtype", name, list(WEIGHT_DTYPES))
    return WEIGHT_DTYPES[name]


@torch.no_grad()
def store_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weight of every Conv2d / Linear layer (our PackedWeight layers) in `dtype` and every other
    floating-point parameter in float32, copying file-mapped tensors into memory and releasing their pages."""
    spans = file_mappings()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            target = dtype if isinstance(module, PackedWeight) and name == "weight" else torch.float32
            if param.is_floating_point() and (param.dtype != target or in_spans(param, spans)):
                setattr(module, name, nn.Parameter(param.to(target, copy=True), requires_grad=param.requires_grad))
                release_pages(param, spans)
    return model


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's file-backed memory mappings (Linux /proc/self/maps; [] elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":   # a non-zero inode: mapped from a file
            start, end = (int(v, 16) for v in fields[0].split("-"))
            spans.append((start, end))
    return spans


def in_spans(tensor: Tensor, spans: list[tuple[int, int]]) -> bool:
    """Whether the tensor's first byte lies in one of the (start, end) address spans."""
    return any(start <= tensor.data_ptr() < end for start, end in spans)


def release_pages(tensor: Tensor, spans: list[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) the pages wholly inside `tensor` when they lie in a file mapping: the kernel drops
    them from this process and reads them back from the file if they are touched again (checkpoint tensors are
    never written in place, so nothing is lost). Anonymous memory is left alone (there it would zero the data)."""
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start and hasattr(mmap, "MADV_DONTNEED") and any(s <= start and end <= e for s, e in spans):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
