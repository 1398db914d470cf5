"""oneDNN weight packing: a transform applied to a loaded model, not part of its layers.

The models (models/) are built from plain nn.Conv2d / nn.Linear. On a CPU, plain conv2d / linear reorder the
weight into oneDNN's blocked layout on every call, which on small inputs costs more than the arithmetic
(docs/performance.md). packed_layers(model) turns every plain Conv2d / Linear of a loaded model into its packed
variant (PackedConv2d / PackedLinear: the same object, its class swapped, so its parameters, state_dict keys,
forward hooks such as an unmerged LoRA's, and any reference to it stay as they are); at inference the layer
convolves / multiplies with a copy of its weight in oneDNN's layout and the input's dtype, kept on the layer and
made again whenever the weight changes (its storage or version, e.g. a LoRA merged into it), the compute dtype
or, for layers sized per input (small weights, 1 x 1 convolutions), the input's shape does. Same result to
rounding. With autograd, on other devices, under torch.compile or with PackedWeight.enabled = False the layers
compute as plain ones, in the input's dtype.

storage.py applies the transform while a model loads (store_weights; pack_weights packs the weights whose layout
does not follow the input's shape at once and hands the plain weight's file pages back), precision.py to compute
in bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .file_pages import release_pages

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACK_SIDE = 32   # the input size a weight is packed for: oneDNN's blocked weight layout serves any input size
# Weights of up to this many elements, and 1 x 1 convolutions, get a layout for each input shape they meet (batch
# included): oneDNN picks their kernel, and with it the weight layout, by the input's whole shape, and a weight
# packed for another shape can run 15-80x slower. Measured (1 Dec 2026): SD's 1280-channel 1 x 1 convolutions
# take 76 ms a call on a batch of 2 at 8 x 8 when packed for batch 1 at 8 x 8, and 1.9 ms when packed for
# batch 2; packed for 32 x 32 they take 76 ms at 4 x 4 (0.7 ms for their own shape); some small convolutions (96
# or 192 output channels) run 15-80x slower on 4 x 4 - 8 x 8 inputs. Repacking them is cheap. The other big
# weights (SD's 3 x 3 convolutions and linears) keep the layout they were packed with, within noise of their own
# shape's on every size measured, so a 256 px image does not repack SD's UNet in its first steps.
REPACK_MAX = 1 << 20


class PackedWeight:
    """Mixin for Conv2d / Linear: computes in its input's dtype (float32 / bfloat16 weights stored in half precision
    by storage.py or computed in bfloat16 by precision.py keep no second full copy) and, for CPU float32 / bfloat16
    inference, with a oneDNN-packed copy of its weight (`packed`: (cache key, packed weight), this layer's own).
    Set PackedWeight.enabled = False to compute with the plain weight everywhere (a layer's own `enabled`: that
    layer; plain_layers)."""

    enabled = True
    packed: tuple[tuple, Tensor] | None = None

    def __getstate__(self) -> dict:
        """The module's state without the packed copy (deepcopy / pickle: the copy packs its own weight)."""
        state = self.__dict__.copy()
        state.pop("packed", None)
        return state

    def packs_for(self, dtype: torch.dtype) -> bool:
        """Whether computing in `dtype` uses a packed weight: float32 / bfloat16 from a float32 weight or one
        already in that dtype (a packed float32 copy of half-precision storage would bring its memory back)."""
        return self.enabled and dtype in PACKED_DTYPES and self.weight.dtype in (torch.float32, dtype)

    def packable(self, x: Tensor) -> bool:
        """CPU inference in a packed dtype (packs_for): no autograd, no torch.compile tracing, oneDNN available,
        and a weight whose changes are tracked (not made under inference_mode)."""
        w = self.weight
        return (self.packs_for(x.dtype) and x.device.type == "cpu" and not w.is_inference()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling())

    def compute_bias(self, x: Tensor) -> Tensor | None:
        """The bias in x's dtype (float32 biases of layers computed in bfloat16)."""
        return self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)

    def compute_weight(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weight and bias in x's dtype for this call only."""
        return (self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)), self.compute_bias(x)

    def is_packed(self) -> bool:
        """Whether a packed copy of the current weight exists (in any dtype)."""
        return self.packed is not None and self.packed[0][:2] == (self.weight.data_ptr(), self.weight._version)

    def sized_per_input(self) -> bool:
        """Whether this layer's packed layout follows its input's shape: weights of up to REPACK_MAX elements and
        1 x 1 convolutions."""
        return self.weight.numel() <= REPACK_MAX or self.weight.shape[2:] == (1, 1)

    def pack_shape(self, x: Tensor) -> tuple[int, ...]:
        """The input shape to pack for: x's own for layers sized per input, else the shape the weight is already
        packed for (the layer's default_shape when not packed yet)."""
        if self.sized_per_input():
            return self.input_shape(x)
        return self.packed[0][3] if self.packed is not None else self.default_shape()

    def packed_weight(self, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
                      spans: list[tuple[int, int]] | None = None) -> Tensor:
        """The weight in oneDNN's layout and `dtype` for inputs of `shape` (default_shape when None), packed on
        first use (or by storage.pack_weights) and again whenever the weight, the dtype or the shape (pack_shape)
        changes; the plain weight's file pages are handed back after packing (file_pages.py; `spans`: the file
        mappings when the caller has read them)."""
        key = (self.weight.data_ptr(), self.weight._version, dtype, shape or self.default_shape())
        if self.packed is None or self.packed[0] != key:
            self.packed = None   # the old copy goes before the new one is made
            self.packed = (key, self.pack(self.weight.detach().to(dtype), key[3]))
            release_pages(self.weight, spans)
        return self.packed[1]


class PackedConv2d(PackedWeight, nn.Conv2d):
    """nn.Conv2d convolving with a oneDNN-packed weight at inference (PackedWeight); output is channels-last."""

    def default_shape(self) -> tuple[int, ...]:
        """One PACK_SIDE x PACK_SIDE image."""
        return (1, self.in_channels, PACK_SIDE, PACK_SIDE)

    def input_shape(self, x: Tensor) -> tuple[int, ...]:
        """The whole input shape (N, C, H, W)."""
        return tuple(x.shape)

    def pack(self, w: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The weight in oneDNN's convolution layout for inputs of `shape`."""
        return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), self.padding, self.stride, self.dilation,
                                                          self.groups, list(shape))

    def forward(self, x: Tensor) -> Tensor:
        plain_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if not (self.packable(x) and x.dim() == 4 and plain_padding):
            return self._conv_forward(x, *self.compute_weight(x))
        return self.with_packed(x, self.packed_weight(x.dtype, self.pack_shape(x)))

    def with_packed(self, x: Tensor, weight: Tensor) -> Tensor:
        """The convolution of x with a packed weight (pack's)."""
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.compute_bias(x), self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


class PackedLinear(PackedWeight, nn.Linear):
    """nn.Linear multiplying by a oneDNN-packed weight at inference (PackedWeight)."""

    def default_shape(self) -> tuple[int, ...]:
        """PACK_SIDE x PACK_SIDE rows."""
        return (PACK_SIDE * PACK_SIDE,)

    def input_shape(self, x: Tensor) -> tuple[int, ...]:
        """The number of rows the input multiplies (all but its last dimension)."""
        return (x.numel() // x.shape[-1],)

    def pack(self, w: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The weight in oneDNN's matmul layout for `shape[0]` rows."""
        return torch.ops.mkldnn._reorder_linear_weight(w, shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if not self.packable(x):
            return F.linear(x, *self.compute_weight(x))
        return self.with_packed(x, self.packed_weight(x.dtype, self.pack_shape(x)))

    def with_packed(self, x: Tensor, weight: Tensor) -> Tensor:
        """x times a packed weight (pack's), plus the bias."""
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.compute_bias(x), "none", [], "")


PACKED = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}


def packed_layers(model: nn.Module) -> nn.Module:
    """Turn every plain nn.Conv2d / nn.Linear of `model` into its packed variant, in place (the layer keeps its
    identity, parameters and hooks; see the module docstring). Layers already packed, and subclasses with their
    own forward, are left as they are."""
    for module in model.modules():
        if type(module) in PACKED:
            module.__class__ = PACKED[type(module)]
    return model


def plain_layers(model: nn.Module) -> nn.Module:
    """Let every packed layer of `model` compute with its plain weight, as nn.Conv2d / nn.Linear do (no packed
    copy is made or kept): for a network run once per image, where packing costs more than it saves."""
    for module in model.modules():
        if isinstance(module, PackedWeight):
            module.enabled = False
            module.packed = None
    return model
