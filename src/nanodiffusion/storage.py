"""Weight storage: where a loaded network's weights live, in which dtype, and their oneDNN-packed copies.

A float32 safetensors checkpoint is used in place: its tensors are views of the memory-mapped file, so loading
copies nothing (store_weights). Half-precision storage (float16 / bfloat16: half the memory, for SD 1.5's UNet
3.4 GB -> 1.7 GB) converts each weight once while loading, one tensor at a time, handing the file pages it was
read from back to the kernel at once (release_pages), so loading never holds two copies. The model's Conv2d /
Linear layers become packed layers (packing.py), which compute in their input's dtype with a copy of their
weight in oneDNN's blocked layout; pack_weights makes those copies while the model loads (but for layers whose
layout follows the input's shape, which pack once on their first call), and hands the plain weight's file pages
back: what stays in memory is the packed copy (the plain weight is read back from the file if it is ever used,
e.g. by training or a merged LoRA). Norms, biases and embeddings stay float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch
from torch import Tensor, nn

from .errors import choice_error
from .file_pages import file_mappings, release_pages
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


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def uninitialised() -> Iterator[None]:
    """Build modules whose parameters a checkpoint will replace: torch.nn.init's functions do nothing, so a
    parameter is only allocated (its pages untouched until written). Unlike the meta device, this costs no
    one-off imports (~1.5 s) and leaves buffers computed in __init__ real."""
    def skip(tensor: Tensor, *args, **kwargs) -> Tensor:
        return tensor

    with mock.patch.multiple(nn.init, **{name: skip for name in INIT_FUNCTIONS}):
        yield


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
def pack_weights(model: nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = (), repack: bool = True,
                 later: tuple[str, ...] = ()) -> nn.Module:
    """Make every Conv2d / Linear a packed layer (packing.packed_layers) and pack its weight now for computing in
    `dtype` (float32 under the submodules named in `keep`; with repack False, only layers not packed yet; under
    the submodules named in `later`, on their first call), then release the plain weights' file pages. Layers
    whose layout follows the input's shape (PackedWeight.sized_per_input) pack on their first call, once, for the
    shape they meet: packed now, most would pack again then (the built-in model's: all of them, 0.2-0.4 s).
    Packing itself is skipped without oneDNN."""
    packed_layers(model)
    if not (PackedWeight.enabled and torch.backends.mkldnn.is_available()):
        return model
    kept, waiting = (set().union(*(getattr(model, name).modules() for name in names
                                   if isinstance(getattr(model, name, None), nn.Module)))
                     for names in (keep, later))
    spans = file_mappings()
    for module in model.modules():
        target = torch.float32 if module in kept else dtype
        if (isinstance(module, PackedWeight) and module not in waiting and module.packs_for(target)
                and not module.sized_per_input() and (repack or not module.is_packed())):
            module.packed_weight(target, spans=spans)
    return model
