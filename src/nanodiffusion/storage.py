"""Weight storage: where a loaded network's weights live, in which dtype, and their oneDNN-packed copies.

A float32 safetensors checkpoint is used in place: its tensors are views of the memory-mapped file, so loading
copies nothing (store_weights). Half-precision storage (float16 / bfloat16: half the memory, for SD 1.5's UNet
3.4 GB -> 1.7 GB) converts each weight once while loading, one tensor at a time, handing the file pages it was
read from back to the kernel at once (release_pages), so loading never holds two copies. The model's Conv2d /
Linear layers become packed layers (packing.py), which compute in their input's dtype with a copy of their
weight in oneDNN's blocked layout; pack_weights makes those copies while the model loads, not on the first call,
and hands the plain weight's file pages back: what stays in memory is the packed copy (the plain weight is read
back from the file if it is ever used, e.g. by training or a merged LoRA). Norms, biases and embeddings stay
float32.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import choice_error
from .packing import PackedWeight, packed_layers

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
    """Store the weight of every Conv2d / Linear layer in `dtype` and every other floating-point parameter in
    float32: tensors already in their dtype stay where they are (a file mapping too), others are converted one by
    one, releasing the file pages they were read from. The layers become packed layers (packing.packed_layers),
    which compute in their input's dtype whatever their weight's."""
    packed_layers(model)
    spans = file_mappings()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            target = dtype if isinstance(module, PackedWeight) and name == "weight" else torch.float32
            if param.is_floating_point() and param.dtype != target:
                setattr(module, name, nn.Parameter(param.to(target), requires_grad=param.requires_grad))
                release_pages(param, spans)
    return model


@torch.no_grad()
def pack_weights(model: nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = (), repack: bool = True
                 ) -> nn.Module:
    """Make every Conv2d / Linear a packed layer (packing.packed_layers) and pack its weight now for computing in
    `dtype` (float32 under the submodules named in `keep`; with repack False, only layers not packed yet), then
    release the plain weights' file pages. Packing itself is skipped without oneDNN."""
    packed_layers(model)
    if not (PackedWeight.enabled and torch.backends.mkldnn.is_available()):
        return model
    kept = {id(m) for name in keep if hasattr(model, name) for m in model.get_submodule(name).modules()}
    spans = file_mappings()
    for module in model.modules():
        target = torch.float32 if id(module) in kept else dtype
        if isinstance(module, PackedWeight) and module.packs_for(target) and (repack or not module.is_packed()):
            module.packed_weight(target)
            release_pages(module.weight, spans)
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
