"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen layer W gets a low-rank update (Eq. 3): h = W x + w * (alpha / r) * B A x, with A = lora_down
[r, in] (random init) and B = lora_up [out, r] (zero init, so training starts exactly at W); w is the
user's weight ("<lora:NAME:0.8>"). Convolutions get the LoCon form: A is a k x k convolution with the
layer's stride and padding, B a 1x1 convolution, so B A is again a k x k kernel.

A LoRA runs unmerged (a forward hook adds the branch: several LoRAs at once, each with its own weight,
changeable between calls) or merged into W (W += w * (alpha / r) * B A, no cost at run time) and unmerged
back. Layers are named as kohya-ss names them ("lora_unet_" / "lora_te_" + the module path with '.' -> '_'),
so a LoRANetwork's state_dict() is the kohya file layout.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import NanoDiffusionError

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")


def kohya_name(part: str, path: str) -> str:
    """kohya-ss's layer name: part prefix + module path with '.' -> '_'."""
    return PREFIXES[part] + path.replace(".", "_")


class LoRALayer(nn.Module):
    """The low-rank branch (alpha / r) * B A for one Linear or Conv2d layer."""

    def __init__(self, target: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if isinstance(target, nn.Linear):
            self.lora_down = nn.Linear(target.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False)
        elif isinstance(target, nn.Conv2d):
            self.lora_down = nn.Conv2d(target.in_channels, rank, target.kernel_size, target.stride, target.padding,
                                       target.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        else:
            raise NanoDiffusionError(f"LoRA applies to Linear and Conv2d layers, not {type(target).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha)))

    def forward(self, x: Tensor) -> Tensor:
        """(alpha / r) * B(A x)."""
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)

    def delta_weight(self) -> Tensor:
        """(alpha / r) * B A in fp32, shaped like the target's weight (a 1x1 conv after a k x k conv is k x k)."""
        down, up = self.lora_down.weight.float(), self.lora_up.weight.float()
        delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(delta.shape[0], *down.shape[1:]) * (self.alpha.float() / self.rank)


class LoRANetwork(nn.Module):
    """A set of LoRA layers over a model's parts (UNet, text encoder), applied unmerged or merged with one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: dict[str, nn.Module] = {}   # layer name -> the model's layer (not a submodule)
        self.weight = 0.0
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.merged_weight: float | None = None   # the weight folded into the model's weights, if merged

    def add(self, name: str, target: nn.Module, rank: int, alpha: float | None = None) -> LoRALayer:
        """Add a LoRA layer for target under its kohya name."""
        layer = LoRALayer(target, rank, alpha).to(target.weight.device)
        self.add_module(name, layer)
        self.targets[name] = target
        return layer

    def layers(self) -> dict[str, LoRALayer]:
        """The LoRA layers by name."""
        return dict(self.named_children())

    def apply_unmerged(self, weight: float = 1.0) -> LoRANetwork:
        """Run unmerged: each target computes W x + weight * (alpha / r) * B A x (change self.weight at will)."""
        self.check_detached()
        self.weight = weight
        for name, layer in self.layers().items():
            layer.to(dtype=self.targets[name].weight.dtype)
            self.hooks.append(self.targets[name].register_forward_hook(self.branch(layer)))
        return self

    def branch(self, layer: LoRALayer):
        """A forward hook adding the weighted LoRA branch to the layer's output."""
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:   # in the branch's dtype (bf16 runs)
            return output + self.weight * layer(args[0].to(layer.lora_down.weight.dtype)).to(output.dtype)
        return hook

    @torch.no_grad()
    def merge(self, weight: float = 1.0) -> LoRANetwork:
        """Fold into the weights: W += weight * (alpha / r) * B A (computed in fp32)."""
        self.check_detached()
        self.merged_weight = weight
        self.add_to_weights(weight)
        return self

    @torch.no_grad()
    def unmerge(self) -> LoRANetwork:
        """Undo merge: W -= weight * (alpha / r) * B A (exact up to fp32 rounding)."""
        if self.merged_weight is not None:
            self.add_to_weights(-self.merged_weight)
            self.merged_weight = None
        return self

    def add_to_weights(self, weight: float) -> None:
        """W += weight * delta for every target."""
        for name, layer in self.layers().items():
            target = self.targets[name].weight
            delta = layer.delta_weight().to(target.device)
            target.copy_((target.float() + weight * delta).to(target.dtype))

    def remove(self) -> LoRANetwork:
        """Take the LoRA out of the model, whether applied or merged."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        return self.unmerge()

    def check_detached(self) -> None:
        """One LoRA is either applied or merged, once."""
        if self.hooks or self.merged_weight is not None:
            raise NanoDiffusionError("this LoRA is already applied or merged; call remove() first")


def is_default_target(part: str, path: str, module: nn.Module, convs: bool) -> bool:
    """kohya-ss's default targets: the Linear / 1x1 conv layers of the UNet's transformer blocks and of the text
    encoder's attention and MLP; with convs (LoCon) also every layer of the res blocks and resamplers."""
    linear = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))
    if part == "text_encoder":
        return isinstance(module, nn.Linear) and (".self_attn." in path or ".mlp." in path)
    if ".attentions." in path:
        return linear
    return convs and isinstance(module, (nn.Linear, nn.Conv2d)) and any(b in path for b in CONV_BLOCKS)


def create_lora(models: Mapping[str, nn.Module], rank: int, alpha: float | None = None, *,
                conv_rank: int | None = None, conv_alpha: float | None = None) -> LoRANetwork:
    """A fresh (zero-update) LoRA over the default targets of models {"unet": ..., "text_encoder": ...};
    conv_rank adds LoCon layers on the k x k convolutions of the res blocks and resamplers."""
    network = LoRANetwork()
    for part, model in models.items():
        for path, module in model.named_modules():
            if is_default_target(part, path, module, conv_rank is not None):
                kxk = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
                network.add(kohya_name(part, path), module, *((conv_rank, conv_alpha) if kxk else (rank, alpha)))
    if not network.targets:
        raise NanoDiffusionError(f"no LoRA targets in parts {', '.join(models)}: expected 'unet' / 'text_encoder' "
                                 "models with attention layers")
    return network
