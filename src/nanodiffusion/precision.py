"""Compute precision: float32 (the parity-exact path) or bfloat16 where Stable Diffusion tolerates it.

bfloat16 keeps float32's exponent with an 8-bit significand; CPUs with AVX512-BF16 (or AMX) multiply it at 2-4x
the float32 rate. `compute_in(model, bfloat16)` packs a network's convolution and linear weights in bfloat16
(packing.py, by storage.pack_weights) and casts its inputs, so activations flow in bfloat16 through convolutions,
matmuls and attention, while what SD needs in float32 stays there: group / layer norm parameters and statistics
(PyTorch accumulates the statistics of bfloat16 inputs in float32), the attention softmax (accumulated in float32
by the CPU SDPA kernel), the timestep embedding (sinusoid and MLP; `keep`), the sampler arithmetic (the network
output is cast back to float32). The measured cost is in docs/performance.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import choice_error
from .packing import packed_layers, plain_layers
from .storage import pack_weights

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_PARAMETERS = 100_000_000   # SD 1.x / 2.x UNets have 860M; the built-in model's has a few million


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def default_precision(parameters: int) -> str:
    """bfloat16 for SD-size networks (`parameters` in the UNet) on CPUs that compute it natively, where it is
    faster at an invisible cost; float32 elsewhere and for small networks such as the built-in model, whose
    small kernels gain nothing from it (docs/performance.md)."""
    return "bfloat16" if parameters >= BF16_MIN_PARAMETERS and cpu_has_bfloat16() else "float32"


def precision_dtype(name: str | None, parameters: int) -> torch.dtype:
    """The compute dtype of a precision name; None picks default_precision(parameters)."""
    name = default_precision(parameters) if name is None else name
    if name not in PRECISIONS:
        raise choice_error("precision", name, list(PRECISIONS))
    return PRECISIONS[name]


def cast_floats(value: object, dtype: torch.dtype) -> object:
    """Floating-point tensors (also inside lists / tuples) in dtype; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    return value


FLOAT32_INPUTS = ("timestep", "time_ids")   # embedded by sinusoids: sizes like 1024 need float32's precision


@torch.no_grad()
def compute_in(model: nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = (),
               keep_args: tuple[int, ...] = (), now: bool = True) -> nn.Module:
    """Run `model` in `dtype`: its Conv2d / Linear layers become packed layers computing with weights packed in
    dtype (but under the submodules named in `keep`: float32; storage.pack_weights), its floating inputs are cast
    to dtype on the way in (but positional arguments `keep_args`, e.g. the timestep) and its output back to float32
    on the way out.
    The stored weights stay as loaded (`now` False: packed on the first call). float32 only packs the weights."""
    if now:
        pack_weights(model, dtype, keep)
    else:
        packed_layers(model)
    if dtype == torch.float32:
        return model

    def cast_inputs(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = tuple(a if i in keep_args else cast_floats(a, dtype) for i, a in enumerate(args))
        return args, {k: v if k in FLOAT32_INPUTS else cast_floats(v, dtype) for k, v in kwargs.items()}

    model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    model.register_forward_hook(lambda _, __, out: cast_floats(out, torch.float32))
    return model


def set_precision(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, dtype: torch.dtype) -> None:
    """A loaded pipeline's networks in `dtype` (see the module docstring), their big weights packed now rather than
    on the first call (storage.pack_weights): the UNet but its timestep embedding, the VAE's decoder, the text
    transformer. The VAE's encoder (img2img, inpainting) packs on its first use, and in float32 the text encoder
    computes with its plain weights (its linears multiply them as they are, and a prompt is encoded once per
    image)."""
    compute_in(unet, dtype, keep=("time_embedding", "add_embedding"), keep_args=(1,))
    compute_in(vae.decoder, dtype)
    compute_in(vae.encoder, dtype, now=False)   # on its first use: a text-to-image process never runs it
    if dtype == torch.float32:
        plain_layers(text_encoder)   # a prompt per image: packing SD's CLIP (0.6 s) costs more than it saves (0.03 s)
    else:
        compute_in(text_encoder.text_model.encoder, dtype)
    pack_weights(vae, torch.float32, repack=False, later=("encoder", "quant_conv"))   # the rest: post_quant_conv
    pack_weights(text_encoder, torch.float32, repack=False)   # the rest: a projection, ...
