"""LoRA files as people share them, and the `<lora:NAME:0.8>` prompt syntax.

Two layouts are in circulation:
- kohya-ss (sd-scripts, the popular web UI): `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`
  and `lora_te_<path>...` for the text encoder (SDXL: `lora_te1_` for CLIP ViT-L, `lora_te2_` for OpenCLIP bigG),
  where <path> is the module path with '.' -> '_'; scale =
  alpha / rank (alpha = rank when absent). The '_'-joined names are ambiguous, so they are resolved against
  the model's own module names, never guessed. Names in the original SD UNet layout (`input_blocks_1_1_...`)
  (SD 1.x, and every kohya SDXL file) go through checkpoint_keys' UNet table. Training metadata lives in the
  safetensors header (`ss_*` strings).
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (scale from the `lora_adapter_metadata`
  header, else 1), older `<path>.lora.down.weight` / `.lora.up.weight`, attention processors
  (`attn1.processor.to_q_lora.down.weight`), `text_encoder.` / `text_encoder_2.` for the text encoders.
Either way a file becomes a models.lora.LoRANetwork, and we save in the kohya layout. A LoRA made for another base
model than the one loaded (SDXL vs SD 1.x / 2.x) is told apart before its layers are matched: SDXL's second text
encoder, the cross-attention width, else kohya's ss_base_model_version.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint_keys import PROJECTION, TEXT_MODEL, UNetLayout, unet_table
from .checkpoints import load_state_dict, sniff_format
from .errors import NanoDiffusionError
from .models.lora import PREFIXES, LoRANetwork, kohya_name

KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2"}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                   "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
                   "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
PROCESSOR_LAYERS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                    "text_encoder": TEXT_PROCESSOR, "text_encoder_2": TEXT_PROCESSOR}
PEFT_METADATA = "lora_adapter_metadata"
BASES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}   # text / cross-attention widths
# kohya's ss_base_model_version ("sd_v1", "sd_v2_768_v", "sdxl_base_v1-0", "sd3", "flux1") by prefix
KOHYA_BASES = {"sdxl": "SDXL", "sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sd3": "SD3", "flux": "Flux.1"}
CROSS_ATTENTION = re.compile(r"attn2[._]to_k$")   # the cross-attention key layer: its input width is the context's
SUFFIXES = (".safetensors", ".pt", ".ckpt")
TAG_OPEN = "<lora:"
MAX_WEIGHT = 10.0   # |weight| of a LoRA: far beyond what any LoRA is used with, far from overflowing float32


@dataclass
class FileLayer:
    """One LoRA layer as a file holds it: where it goes and its tensors, with the file's key for errors."""

    key: str
    part: str
    path: str
    tensors: dict[str, Tensor] = field(default_factory=dict)   # "down", "up", optionally "alpha"


# ---- Reading ----

def load_lora(path: str | Path, models: Mapping[str, nn.Module | None]) -> LoRANetwork:
    """A kohya or diffusers / PEFT LoRA file resolved against models {"unet": ..., "text_encoder": ...[,
    "text_encoder_2": ...]} (None entries, such as the SDXL refiner's missing first text encoder, are skipped);
    call .apply_unmerged(weight) or .merge(weight) on the result."""
    path = Path(path)
    models = {part: model for part, model in models.items() if model is not None}
    sd = load_state_dict(path)
    if any(key.startswith("lora_") for key in sd):
        layers = kohya_layers(sd, models)
    elif any(is_diffusers_key(key) for key in sd):
        layers = diffusers_layers(sd)
    else:
        raise NanoDiffusionError(f"{path}: not a LoRA file (no lora_down / lora_up or lora_A / lora_B keys; it has "
                                 f"{', '.join(sorted(sd)[:3])}, ...); pass a kohya or diffusers LoRA .safetensors")
    metadata = read_metadata(path) if sniff_format(path) == "safetensors" else {}
    check_base(path, lora_base(layers, metadata), models)
    return build_network(path, layers, models, peft_alphas(metadata))


def kohya_layers(sd: dict[str, Tensor], models: Mapping[str, nn.Module]) -> list[FileLayer]:
    """Group kohya keys by layer and resolve each '_'-joined name to a module path of the model."""
    names = module_names(models)
    layers: dict[str, FileLayer] = {}
    for key, tensor in sd.items():
        name, _, suffix = key.partition(".")
        if suffix not in KOHYA_ROLES:
            raise NanoDiffusionError(f"unsupported LoRA key {key!r}: only plain LoRA / LoCon (lora_down, lora_up, "
                                     "alpha) is supported, not LyCORIS LoHa / LoKr / DoRA")
        part, module = names.get(name, ("", ""))
        layers.setdefault(name, FileLayer(name, part, module)).tensors[KOHYA_ROLES[suffix]] = tensor
    return list(layers.values())


def module_names(models: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya name -> (part, module path) for every Linear / Conv2d layer, in diffusers and original UNet names."""
    names = {}
    for part, model in models.items():
        paths = [path for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        prefixes = [p for p, name in KOHYA_PARTS.items() if name == part]
        names.update({p + path.replace(".", "_"): (part, path) for p in prefixes for path in paths})
        if part == "unet":
            names.update({p + original.replace(".", "_"): (part, path) for p in prefixes
                          for path, original in original_unet_paths(model, paths).items()})
    return names


def original_unet_paths(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """diffusers module path -> the original SD layout's path ("down_blocks.0.attentions.0" -> "input_blocks.1.1")."""
    sd = unet.state_dict()
    if not any(key.startswith("down_blocks.") for key in sd):
        return {}
    table = unet_table(UNetLayout.from_diffusers(sd))
    renamed = {path: table.rename(path + ".weight", to_original=True) for path in paths}
    return {path: found[0].removesuffix(".weight") for path, found in renamed.items() if found}


def is_diffusers_key(key: str) -> bool:
    """Whether a key is a diffusers / PEFT LoRA weight."""
    return bool(PROCESSOR.match(key)) or any(key.endswith("." + s) for s in DIFFUSERS_ROLES if s != "alpha")


def diffusers_layers(sd: dict[str, Tensor]) -> list[FileLayer]:
    """Group diffusers / PEFT keys by layer: `<part>.<module path>.<role>`."""
    layers: dict[str, FileLayer] = {}
    for key, tensor in sd.items():
        part, module, role = diffusers_key(key.removeprefix("base_model.model."))
        layers.setdefault(f"{part}.{module}", FileLayer(key, part, module)).tensors[role] = tensor
    return list(layers.values())


def diffusers_key(key: str) -> tuple[str, str, str]:
    """(part, module path, role) of one diffusers / PEFT key; files saved from one model have no part prefix."""
    part, _, rest = key.partition(".")
    if part not in PROCESSOR_LAYERS:
        part, rest = ("text_encoder" if key.startswith((TEXT_MODEL, "encoder.layers.")) else "unet"), key
    if part != "unet" and not rest.startswith(PROJECTION):   # transformers 5 saves without "text_model."
        rest = TEXT_MODEL + rest.removeprefix(TEXT_MODEL)
    processor = PROCESSOR.match(rest)
    if processor:
        base, layer, role = processor.groups()
        return part, f"{base}.{PROCESSOR_LAYERS[part][layer]}", role
    for suffix, role in DIFFUSERS_ROLES.items():
        if rest.endswith("." + suffix):
            return part, rest[:-len(suffix) - 1], role
    raise NanoDiffusionError(f"unsupported LoRA key {key!r}: expected lora_A / lora_B, lora.down / lora.up or alpha")


def peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """PEFT's lora_alpha / alpha_pattern per part from the diffusers safetensors header ({} when absent)."""
    text = metadata.get(PEFT_METADATA)
    found: dict[str, dict] = {}
    for key, value in (json.loads(text) if text else {}).items():
        part, _, name = key.partition(".")
        found.setdefault(part, {})[name] = value
    return found


def layer_alpha(layer: FileLayer, peft: dict[str, dict], rank: int) -> float:
    """The layer's alpha: its own alpha tensor, else PEFT's alpha_pattern / lora_alpha, else the rank (scale 1)."""
    if "alpha" in layer.tensors:
        return float(layer.tensors["alpha"])
    config = peft.get(layer.part, {})
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if layer.path == pattern or layer.path.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def lora_base(layers: list[FileLayer], metadata: Mapping[str, str]) -> str | None:
    """The base model a LoRA was made for: SDXL when it adapts a second text encoder, else the one its cross-attention
    width names (BASES), else kohya's ss_base_model_version; None when nothing tells."""
    if any(layer.part == "text_encoder_2" or layer.key.startswith("lora_te2_") for layer in layers):
        return "SDXL"
    widths = [layer.tensors["down"].shape[1] for layer in layers
              if "down" in layer.tensors and CROSS_ATTENTION.search(layer.path or layer.key)]
    if widths and widths[0] in BASES:
        return BASES[widths[0]]
    version = metadata.get("ss_base_model_version", "")
    return next((base for prefix, base in KOHYA_BASES.items() if version.startswith(prefix)), None)


def model_base(models: Mapping[str, nn.Module]) -> str | None:
    """The loaded model's base: "SDXL" with a second text encoder, else the BASES name of its cross-attention width,
    "" for other widths (an SD-shaped UNet with one text encoder); None for other networks (SD3's MMDiT, ...)."""
    unet = models.get("unet")
    widths = [m.in_features for path, m in unet.named_modules()
              if CROSS_ATTENTION.search(path) and isinstance(m, nn.Linear)] if unet is not None else []
    if not widths:
        return None
    return "SDXL" if "text_encoder_2" in models else BASES.get(widths[0], "")


def check_base(path: Path, made_for: str | None, models: Mapping[str, nn.Module]) -> None:
    """Refuse, in one line naming both, a LoRA made for another base model than the loaded one (an SDXL LoRA on an
    SD 1.x model, an SD 1.5 LoRA on SDXL); a model of another width is told apart from SDXL by its text encoders."""
    loaded = model_base(models)
    if made_for is None or loaded is None:
        return
    if made_for != loaded if loaded else made_for == "SDXL":
        model = loaded or "an SD 1.x / 2.x-style model (one text encoder)"
        raise NanoDiffusionError(f"{path.name}: this LoRA was made for {made_for}, but the loaded model is {model}; "
                                 "load it with a model of its own base, or pick a LoRA made for this model")


def build_network(path: Path, layers: list[FileLayer], models: Mapping[str, nn.Module],
                  peft: dict[str, dict]) -> LoRANetwork:
    """Check every layer against the model (target exists, ranks agree, shapes fit) and load it."""
    targets = {part: dict(model.named_modules()) for part, model in models.items()}
    unmatched = [layer.key for layer in layers if layer.path not in targets.get(layer.part, {})]
    if unmatched:
        raise NanoDiffusionError(f"{path}: {len(unmatched)} of {len(layers)} LoRA layers match nothing in this model "
                                 f"({', '.join(sorted(unmatched)[:3])}{', ...' if len(unmatched) > 3 else ''}); "
                                 "is it a LoRA for another kind of model (SDXL, Flux)?")
    network = LoRANetwork()
    for layer in layers:
        target = targets[layer.part][layer.path]
        down, up = check_shapes(path, layer, target)
        loaded = network.add(kohya_name(layer.part, layer.path), target, down.shape[0],
                             layer_alpha(layer, peft, down.shape[0]))
        loaded.lora_down.weight.data.copy_(down.reshape(loaded.lora_down.weight.shape))
        loaded.lora_up.weight.data.copy_(up.reshape(loaded.lora_up.weight.shape))
    return network


def check_shapes(path: Path, layer: FileLayer, target: nn.Module) -> tuple[Tensor, Tensor]:
    """down [r, in, (k, k)] and up [out, r, (1, 1)] of a layer, checked against its target layer's weight."""
    if "down" not in layer.tensors or "up" not in layer.tensors:
        missing = "up" if "down" in layer.tensors else "down"
        raise NanoDiffusionError(f"{path}: LoRA layer {layer.key} lacks its {missing} weight; the file is incomplete")
    if not isinstance(target, (nn.Linear, nn.Conv2d)):
        raise NanoDiffusionError(f"{path}: LoRA layer {layer.key} targets {layer.path}, a {type(target).__name__}; "
                                 "LoRA applies to Linear and Conv2d layers only")
    down, up = layer.tensors["down"], layer.tensors["up"]
    if down.shape[0] != up.shape[1]:
        raise NanoDiffusionError(f"{path}: rank mismatch in LoRA layer {layer.key}: down {tuple(down.shape)} has rank "
                                 f"{down.shape[0]} but up {tuple(up.shape)} has rank {up.shape[1]}; the file is broken")
    weight = target.weight
    fits = (up.shape[0] == weight.shape[0] and up[0].numel() == down.shape[0] and down.shape[1] == weight.shape[1]
            and down[0].numel() == weight[0].numel())
    if not fits:
        have, want = (up.shape[0], *down.shape[1:]), tuple(weight.shape)
        raise NanoDiffusionError(f"{path}: LoRA layer {layer.key} has shape {have} but the model's {layer.part} "
                                 f"{layer.path} is {want}: a LoRA for another base model{base_hint(have, want)}")
    return down, up


def base_hint(have: tuple[int, ...], want: tuple[int, ...]) -> str:
    """" (SD 2.x LoRA on an SD 1.x model?)" when a mismatching width names both bases, else ""."""
    for a, b in zip(have, want):
        if a != b and a in BASES and b in BASES and BASES[a] != BASES[b]:
            return f" ({BASES[a]} LoRA on an {BASES[b]} model?)"
    return ""


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata strings (kohya's ss_* training metadata, PEFT's adapter config)."""
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise NanoDiffusionError(f"{path}: not a readable safetensors file ({error})") from None


# ---- Writing (kohya layout) ----

def save_lora(network: LoRANetwork, path: str | Path, *, base_model_version: str = "sd_v1",
              metadata: Mapping[str, object] | None = None) -> None:
    """Save in the kohya layout with training metadata (ss_network_dim, ss_network_alpha, ... as strings)."""
    tensors = {key: t.detach().float().cpu().contiguous() for key, t in network.state_dict().items()}
    save_file(tensors, str(path), metadata=training_metadata(network, base_model_version, metadata or {}))


def training_metadata(network: LoRANetwork, base_model_version: str, extra: Mapping[str, object]) -> dict[str, str]:
    """kohya-ss's header fields: the most common rank / alpha of Linear and of k x k conv layers, base model."""
    def most_common(conv: bool) -> tuple[int, float] | None:
        found = Counter((layer.rank, float(layer.alpha)) for layer in network.layers().values()
                        if (isinstance(layer.lora_down, nn.Conv2d) and layer.lora_down.kernel_size != (1, 1)) == conv)
        return found.most_common(1)[0][0] if found else None

    linear, conv = most_common(False) or most_common(True), most_common(True)
    fields = {"ss_network_module": "networks.lora", "ss_network_dim": linear[0], "ss_network_alpha": linear[1],
              "ss_network_args": json.dumps({"conv_dim": str(conv[0]), "conv_alpha": str(conv[1])} if conv else {}),
              "ss_base_model_version": base_model_version, "ss_v2": base_model_version.startswith("sd_v2"),
              "ss_text_encoder_lr_used": any(not name.startswith(PREFIXES["unet"]) for name in network.targets)}
    fields.update(extra)
    return {key: value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list))
            else str(value) for key, value in fields.items()}


# ---- Prompt syntax ----

def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take out the web UI's `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags: (prompt without them, [(name, weight)]).

    A tag runs from `<lora:` to the next `>`; further `:fields` are ignored, and `<lora:` with no name is plain
    text. One forward scan with str.find (each `>` is looked for once, each tag copied once), so any prompt is read
    in linear time.
    """
    pieces, tags = [], []
    kept = 0            # prompt[kept:] is not yet copied to pieces
    close = -1          # the first ">" at or after the current tag start (-1: not looked for yet)
    start = prompt.find(TAG_OPEN)
    while start != -1:
        if close < start:
            close = prompt.find(">", start)
            if close == -1:
                break
        if prompt[start + len(TAG_OPEN)] in ":>":    # no name: plain text (checked without copying the tag)
            start = prompt.find(TAG_OPEN, start + 1)
            continue
        name, _, rest = prompt[start + len(TAG_OPEN):close].partition(":")
        tag = prompt[start:close + 1]
        weight, _, _ = rest.partition(":")
        if not name.strip():
            raise NanoDiffusionError(f"LoRA tag {shorten(tag)} names no LoRA: write <lora:NAME:0.8>")
        tags.append((name.strip(), lora_weight(weight.strip() or "1", tag)))
        pieces.append(prompt[kept:start])
        kept = close + 1
        start = prompt.find(TAG_OPEN, kept)
    pieces.append(prompt[kept:])
    return re.sub(r"\s{2,}", " ", "".join(pieces)).strip(), tags


def lora_weight(text: str, where: str) -> float:
    """A LoRA weight from text (a prompt tag or --lora FILE:W), refusing what is not a finite, sane number."""
    try:
        weight = float(text)
    except ValueError:
        raise NanoDiffusionError(f"bad LoRA weight {shorten(text)} in {shorten(where)}: write <lora:NAME:0.8>"
                                 ) from None
    check_lora_weight(weight, where)
    return weight


def check_lora_weight(weight: float, where: str | Path) -> None:
    """LoRA weights must be finite and within +-MAX_WEIGHT (a huge weight overflows the model to NaN)."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
        raise NanoDiffusionError(f"LoRA weight {weight!r} for {shorten(str(where))} is not allowed: use a number "
                                 f"from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}")


def shorten(text: str, limit: int = 60) -> str:
    """repr of text cut to limit characters, for error messages that quote user input."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def resolve_lora_tags(prompt: str, folder: str | Path | None) -> tuple[str, list[tuple[Path, float]]]:
    """Strip `<lora:NAME:W>` tags from a prompt and find each NAME in the LoRA folder: (text, [(file, weight)])."""
    text, tags = extract_lora_tags(prompt)
    if tags and folder is None:
        raise NanoDiffusionError("the prompt names LoRAs (<lora:...>) but no LoRA folder is set: "
                                 "pass --lora-dir FOLDER")
    return text, [(find_lora(name, folder), weight) for name, weight in tags]


def find_lora(name: str, folder: str | Path) -> Path:
    """The LoRA file NAME.safetensors / .pt / .ckpt in folder (or its subfolders)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()) if folder.is_dir() else []
    for suffix in SUFFIXES:
        for file in files:
            if file.name == name + suffix or file.relative_to(folder).as_posix() == name + suffix:
                return file
    available = sorted({file.stem for file in files})
    raise NanoDiffusionError(f"no LoRA named {name!r} in {folder}; " + (
        f"available: {', '.join(available)}" if available else "the folder has no .safetensors / .pt / .ckpt files"))


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]` (the --lora option) -> (file, weight); a colon not followed by a number is part of FILE."""
    file, _, weight = text.rpartition(":")
    try:
        return (Path(file), float(weight)) if file else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0
