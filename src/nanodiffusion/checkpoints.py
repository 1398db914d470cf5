"""Every on-disk format in one place: safe tensor loading, original single-file SD checkpoints,
diffusers pipeline folders, the model hash, `nanodiff info` and `nanodiff convert`.

Models are handled as state dicts in diffusers / transformers names plus their config.json dicts;
the original single-file layout goes through the key tables in checkpoint_keys.py.
Pickles are only ever read with torch.load(weights_only=True): a file that would run code is refused.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import sd3, sdxl
from .checkpoint_keys import (
    CLIP_PREFIX,
    MMDIT_PATCHES,
    OPEN_CLIP_PREFIX,
    REFINER_OPEN_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    diffusers_to_original,
    has_prefix,
    key_error,
    original_to_diffusers,
    t5_names,
    text_model_names,
)
from .checkpoint_configs import SDXL_VERSIONS, infer_config
from .errors import NanoDiffusionError, choice_error
from .file_hashes import file_sha256
from .models.clip import BOS, EOS
from .prediction import choose_prediction
from .weight_files import part_weights, weight_map

# layout: the built-in model's only; transformer (the MMDiT) and text_encoder_3 (T5): SD3's
PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "layout")
PART_CLASSES = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"], "layout": ["nanodiffusion", "LayoutModel"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "text_encoder_3": ["transformers", "T5EncoderModel"]}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"   # rectified flow (SD3): the network predicts a velocity
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
# What diffusers' SDXL pipelines read from model_index.json, with their defaults per version (base, refiner).
SDXL_FLAGS = {"force_zeros_for_empty_prompt": {"xl": True, "xl-refiner": False},
              "requires_aesthetics_score": {"xl": False, "xl-refiner": True}}
# Flux.1's transformer blocks: BFL's names, and diffusers' (whose double blocks are "transformer_blocks", as in SD3)
FLUX_BLOCKS = ("double_blocks.", "single_blocks.", "single_transformer_blocks.")
TRANSFORMER_CLASSES = ("SD3Transformer2DModel",)   # the transformer/ folders we load: SD3 / SD3.5's MMDiT
DIFFUSERS_VERSION = "0.30.0"
METADATA_KEY = "nanodiffusion"   # safetensors metadata: the configs, so our own single files round-trip exactly


# ---- Safe loading ----

def sniff_format(path: Path) -> str:
    """The file's format from its first bytes: "safetensors", "torch-zip" or "pickle" (legacy torch.save)."""
    if not path.is_file():
        raise NanoDiffusionError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise NanoDiffusionError(f"{path}: the file is empty (an interrupted download or copy?)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":   # before pickle: the header length's first byte may be 0x80
        if 8 + int.from_bytes(head[:8], "little") > size:
            raise NanoDiffusionError(f"{path}: truncated safetensors file (header longer than the file); "
                                     "download or copy it again")
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise NanoDiffusionError(f"{path}: unknown format (not safetensors nor a PyTorch .ckpt/.bin/.pt); "
                             "pass a Stable Diffusion checkpoint or a diffusers folder")


def load_state_dict(path: str | Path, *, keep_dtype: bool = False) -> dict[str, Tensor]:
    """All tensors of a .safetensors / .ckpt / .bin / .pt file (or of the shards a *.index.json names); fp16 / bf16
    become fp32 unless keep_dtype."""
    path = Path(path)
    if path.name.endswith(".json"):
        return load_shards(path, keep_dtype)
    kind = sniff_format(path)
    try:
        sd = load_file(path) if kind == "safetensors" else read_torch(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise NanoDiffusionError(f"{path}: refused to load: the pickle asks to run "
                                 f"{found.group(1) if found else 'code'}; nothing was "
                                 "executed. Use a .safetensors file, or convert this one with a tool you trust"
                                 ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoDiffusionError(f"{path}: truncated or corrupt {kind} file ({first}); download or copy it again"
                                 ) from None
    if not sd:
        raise NanoDiffusionError(f"{path}: the file holds no tensors")
    return sd if keep_dtype else {k: to_float32(t) for k, t in sd.items()}


def read_torch(path: Path) -> dict[str, Tensor]:
    """torch.load restricted to tensors and plain containers (weights_only); given the open file, so torch
    goes by the sniffed content rather than the file name."""
    with open(path, "rb") as f:
        return unwrap(torch.load(f, map_location="cpu", weights_only=True))


def unwrap(obj: object) -> dict[str, Tensor]:
    """The tensors of a torch.load result; Lightning .ckpt files keep them under "state_dict"."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def to_float32(t: Tensor) -> Tensor:
    """Half-precision weights computed on the CPU are upcast to fp32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def load_into(model: torch.nn.Module, sd: dict[str, Tensor], part: str, assign: bool = False) -> None:
    """model.load_state_dict with one-line errors naming missing / unexpected keys and mismatched shapes; with
    `assign` the checkpoint's tensors become the parameters (no copy)."""
    expected = model.state_dict()
    for kind, keys in (("missing", expected.keys() - sd.keys()), ("unexpected", sd.keys() - expected.keys())):
        if keys:
            raise key_error(part, kind, list(keys))
    for key, tensor in sd.items():
        if tensor.shape != expected[key].shape:
            raise NanoDiffusionError(f"{part}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                                     f"model {tuple(expected[key].shape)}; the config does not match the weights")
    model.load_state_dict(sd, assign=assign)


# ---- A loaded checkpoint ----

@dataclass
class Checkpoint:
    """A Stable Diffusion model on disk, read into state dicts (diffusers / transformers names) and configs."""

    parts: dict[str, dict[str, Tensor]]                 # "unet", "vae", "text_encoder"[, "text_encoder_2"]
    configs: dict[str, dict]                            # config.json dict per part
    scheduler: dict                                     # scheduler_config.json dict
    info: dict = field(default_factory=dict)            # format, version, inpainting, path (SDXL: SDXL_FLAGS)
    tokenizer_dir: Path | None = None                   # folder with vocab.json + merges.txt, when there is one
    tokenizer_2_dir: Path | None = None                 # SDXL's second (bigG) tokenizer folder, when there is one
    tokenizer_3_dir: Path | None = None                 # SD3's T5 tokenizer folder (tokenizer.json), when there is one


def detect_version(sd: dict[str, Tensor]) -> str:
    """"v1" (CLIP ViT-L, context 768), "v2" (OpenCLIP ViT-H, context 1024), "xl" (CLIP ViT-L + OpenCLIP bigG,
    context 2048), "xl-refiner" (bigG alone, context 1280) or "sd3" (an MMDiT, SD3 and SD3.5) from an original file's
    keys, "custom" for other sizes."""
    if UNET_PREFIX + MMDIT_PATCHES in sd:
        return "sd3"
    if has_prefix(sd, SDXL_OPEN_CLIP_PREFIX):
        return "xl"
    if has_prefix(sd, REFINER_OPEN_CLIP_PREFIX):
        return "xl-refiner"
    if has_prefix(sd, OPEN_CLIP_PREFIX):
        return "v2"
    if has_prefix(sd, CLIP_PREFIX):
        return "v1"
    return version_from_unet(sd)


def version_from_unet(unet: dict[str, Tensor]) -> str:
    """The version from the cross-attention width (768: v1, 1024: v2, 2048: xl, 1280: xl-refiner); attn2.to_k has
    the same name in both layouts."""
    widths = {t.shape[1] for k, t in unet.items() if k.endswith("attn2.to_k.weight")}
    return {768: "v1", 1024: "v2", 2048: "xl", 1280: "xl-refiner"}.get(next(iter(widths), 0), "custom")


def version_from_parts(parts: dict[str, dict[str, Tensor]]) -> str:
    """A diffusers folder's version: SD3 has a transformer (MMDiT) instead of a UNet, SDXL a second text encoder (the
    refiner that one only), else the UNet's."""
    if "transformer" in parts:
        return "sd3"
    if "text_encoder_2" in parts:
        return "xl" if "text_encoder" in parts else "xl-refiner"
    return version_from_unet(parts["unet"])


def is_inpainting(unet: dict[str, Tensor]) -> bool:
    """Inpainting UNets take 9 input channels: latent (4) + mask (1) + masked-image latent (4)."""
    return unet["conv_in.weight"].shape[1] == 9


def load_checkpoint(path: str | Path, *, prediction: str | None = None, keep_dtype: bool = False) -> Checkpoint:
    """Read a diffusers folder or an original single file. prediction ("epsilon" / "v_prediction") overrides the
    file's: single files cannot tell, and SD 2.x 768 models need "v_prediction"."""
    path = Path(path)
    ckpt = load_folder(path, keep_dtype) if path.is_dir() else load_single_file(path, keep_dtype)
    if prediction is not None:
        set_prediction(ckpt, prediction)
    flow = ckpt.scheduler.get("_class_name") == FLOW_SCHEDULER
    ckpt.info.update(path=str(path), inpainting="unet" in ckpt.parts and is_inpainting(ckpt.parts["unet"]),
                     prediction="flow" if flow else ckpt.scheduler.get("prediction_type", "epsilon"),
                     prediction_from="set by --prediction" if prediction is not None else
                     f"from the scheduler config ({FLOW_SCHEDULER})" if flow else None)
    return ckpt


def settle_prediction(ckpt: Checkpoint, unet: torch.nn.Module | None = None) -> None:
    """Unless it was set, choose the prediction type (an SD 2.x single file: probe its UNet, prediction.py) and
    record why in ckpt.info["prediction_from"]."""
    if ckpt.info.get("prediction_from") is not None:
        return
    prediction, why = choose_prediction(ckpt, unet)
    if prediction != ckpt.info["prediction"]:
        set_prediction(ckpt, prediction)
    ckpt.info.update(prediction=prediction, prediction_from=why)


def set_prediction(ckpt: Checkpoint, prediction: str) -> None:
    """Set the prediction type; inferred SD 2.x v-prediction configs also get the 768 px size those models use."""
    if prediction not in ("epsilon", "v_prediction"):
        raise choice_error("prediction type", prediction, ["epsilon", "v_prediction"])
    ckpt.scheduler["prediction_type"] = prediction
    if ckpt.info.get("inferred") and ckpt.info.get("version") == "v2" and prediction == "v_prediction":
        ckpt.configs["unet"]["sample_size"] = 96
        if "vae" in ckpt.configs:
            ckpt.configs["vae"]["sample_size"] = 768


def load_single_file(path: Path, keep_dtype: bool = False) -> Checkpoint:
    """An original single-file checkpoint: convert the keys, infer the configs from tensor shapes
    (or read them from our own safetensors metadata)."""
    if sniff_format(path) == "safetensors":   # told from the header, before reading gigabytes of another model
        check_stable_diffusion(path, header_keys(path))
    sd = load_state_dict(path, keep_dtype=keep_dtype)
    check_stable_diffusion(path, sd)
    version = detect_version(sd)
    parts = original_to_diffusers(sd)
    saved = read_metadata(path)
    configs = {name: saved.get(name) or infer_config(name, part, version) for name, part in parts.items()}
    default = (sdxl.scheduler_config() if version in SDXL_VERSIONS else dict(sd3.SCHEDULER) if version == "sd3"
               else default_scheduler("epsilon"))
    scheduler = saved.get("scheduler") or default
    tokenizer_3 = path.parent / "tokenizer_3"   # SD3's T5 tokenizer, which no single file holds
    return Checkpoint(parts, configs, scheduler, {"format": sniff_format(path), "version": version,
                                                  "inferred": not saved, **sdxl_flags(version, saved)},
                      tokenizer_3_dir=tokenizer_3 if "text_encoder_3" in parts and tokenizer_3.is_dir() else None)


def header_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors header, without reading a tensor ([] when unreadable: loading says why)."""
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError):
        return []


def check_stable_diffusion(path: Path, keys: Collection[str]) -> None:
    """Refuse, in one line naming what the file holds, a model file that is no Stable Diffusion single file: a Flux.1
    transformer (BFL's double_blocks / single_blocks or diffusers' single_transformer_blocks, bare or under
    model.diffusion_model. as ComfyUI packs it), or any other file without the UNet's input_blocks or SD3's MMDiT
    (its x_embedder)."""
    names = [key.removeprefix(UNET_PREFIX) for key in keys]
    flux = next((name for name in names if name.startswith(FLUX_BLOCKS)), None)
    if flux is not None:
        raise NanoDiffusionError(f"Flux.1 is not supported: {path.name} is a Flux.1 transformer ({flux}, ...); "
                                 "nanodiffusion runs Stable Diffusion 1.x / 2.x / XL / SD3 files and folders")
    if names and UNET_PREFIX + MMDIT_PATCHES not in keys and not any(key.startswith(UNET_PREFIX + "input_blocks.")
                                                                     for key in keys):
        groups = list(dict.fromkeys(name.split(".")[0] for name in names))
        held = ", ".join(groups[:5]) + (", ..." if len(groups) > 5 else "")
        raise NanoDiffusionError(f"unknown model file {path.name}: no Stable Diffusion UNet ({UNET_PREFIX}input_blocks"
                                 f".*); it holds {held} ({len(names)} tensors): pass an SD 1.x / 2.x / XL / SD3 "
                                 "checkpoint or a diffusers folder")


def sdxl_flags(version: str, index: dict) -> dict:
    """SDXL's pipeline settings (SDXL_FLAGS) from a model index, by default the version's; {} for other models."""
    if version not in SDXL_VERSIONS:
        return {}
    return {name: bool(index.get(name, defaults[version])) for name, defaults in SDXL_FLAGS.items()}


def read_metadata(path: Path) -> dict:
    """The configs nanodiffusion stores in a .safetensors header ({} for other files)."""
    if sniff_format(path) != "safetensors":
        return {}
    try:
        with safe_open(path, "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
        configs = json.loads(text) if text else {}
    except (SafetensorError, json.JSONDecodeError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise NanoDiffusionError(f"{path}: truncated or corrupt safetensors header ({first}); download or copy it "
                                 "again") from None
    if not isinstance(configs, dict):
        raise NanoDiffusionError(f"{path}: the {METADATA_KEY} entry of its header is not a JSON object")
    return configs


def default_scheduler(prediction: str) -> dict:
    """The SD training schedule: scaled-linear betas 0.00085 -> 0.012 over 1000 steps, as the published SD 1.5
    scheduler_config.json gives it (no timestep_spacing: each sampler takes its diffusers scheduler's default)."""
    return {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": prediction, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


# ---- Diffusers folders ----

def is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder has model_index.json or at least unet/config.json."""
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def load_shards(index: Path, keep_dtype: bool = False) -> dict[str, Tensor]:
    """All tensors of a sharded part: every shard file its index's "weight_map" names, checking that each tensor
    the index lists was found in one of them."""
    shard_of = weight_map(index)
    sd: dict[str, Tensor] = {}
    for shard in dict.fromkeys(shard_of.values()):
        if not (index.parent / shard).is_file():
            raise NanoDiffusionError(f"{index.parent / shard}: missing, and {index.name} lists it as a shard of "
                                     "this part; the download is incomplete, copy that file too")
        sd.update(load_state_dict(index.parent / shard, keep_dtype=keep_dtype))
    missing = [name for name in shard_of if name not in sd]
    if missing:
        raise NanoDiffusionError(f"{index}: {len(missing)} tensors it lists are in none of the shards (first: "
                                 f"{missing[0]}); the shards are from another save, copy the folder again")
    return sd


def read_json(path: Path) -> dict:
    """A JSON config file, with a one-line error when it is missing or broken."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NanoDiffusionError(f"{path}: missing; the diffusers folder is incomplete") from None
    except json.JSONDecodeError as e:
        raise NanoDiffusionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise NanoDiffusionError(f"{path}: not a config (a JSON object of settings); the folder is damaged")
    return data


def modern_vae_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Older diffusers folders name the VAE attention query / key / value / proj_attn."""
    names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, tensor in sd.items():
        for old, new in names.items():
            key = key.replace(old, new)
        out[key] = tensor
    return out


NAME_FIXES = {"unet": dict, "transformer": dict, "vae": modern_vae_names, "text_encoder": text_model_names,
              "text_encoder_2": text_model_names, "text_encoder_3": t5_names, "layout": dict}


def load_folder(path: Path, keep_dtype: bool = False) -> Checkpoint:
    """A diffusers pipeline folder: model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/ (SDXL: also
    text_encoder_2/ tokenizer_2/; the refiner has no text_encoder/ tokenizer/; SD3: transformer/ for unet/, and
    text_encoder_3/ tokenizer_3/ when it has T5)."""
    if not is_diffusers_folder(path):
        raise NanoDiffusionError(f"{path}: a folder but not a diffusers pipeline (no model_index.json or "
                                 "unet/config.json); pass a checkpoint file or a diffusers folder")
    parts, configs = {}, {}
    denoiser = "transformer" if (path / "transformer").is_dir() else "unet"
    if denoiser == "transformer":
        check_transformer(path, read_json(path / "transformer" / "config.json"))
    for name in [p for p in PARTS if p == denoiser or (path / p).is_dir() and p not in ("unet", "transformer")]:
        config = read_json(path / name / "config.json")
        configs[name] = config.get("text_config", config)
        parts[name] = NAME_FIXES[name](load_state_dict(part_weights(path / name), keep_dtype=keep_dtype))
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_file) if scheduler_file.is_file() else default_scheduler("epsilon")
    tokenizers = [path / name for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    version = version_from_parts(parts)
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    return Checkpoint(parts, configs, scheduler, {"format": "diffusers", "version": version,
                                                  **sdxl_flags(version, index)},
                      *(folder if folder.is_dir() else None for folder in tokenizers))


def check_transformer(folder: Path, config: dict) -> None:
    """A diffusers folder's transformer/ must be SD3's MMDiT: Flux.1's, or another, is one clear line."""
    name = config.get("_class_name", "SD3Transformer2DModel")
    if name.startswith("Flux"):
        raise NanoDiffusionError(f"Flux.1 is not supported: {folder.name} is a Flux.1 pipeline (transformer/ is a "
                                 f"{name}); nanodiffusion runs Stable Diffusion 1.x / 2.x / XL and SD3 models")
    if name not in TRANSFORMER_CLASSES:
        raise NanoDiffusionError(f"unknown model {folder.name}: its transformer/ is a {name}, not SD3's "
                                 f"{TRANSFORMER_CLASSES[0]}; nanodiffusion runs Stable Diffusion 1.x / 2.x / XL and "
                                 "SD3 models")


def save_diffusers(ckpt: Checkpoint, folder: str | Path) -> None:
    """Write a diffusers pipeline folder that diffusers.StableDiffusionPipeline.from_pretrained loads (SDXL:
    StableDiffusionXLPipeline, the refiner StableDiffusionXLImg2ImgPipeline; SD3: StableDiffusion3Pipeline, with the
    T5 tokenizer when the checkpoint has one)."""
    folder = Path(folder)
    version = ckpt.info.get("version", "v1")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "scheduler": PART_CLASSES["scheduler"]}
    if version in SDXL_VERSIONS:
        index = {"_class_name": "StableDiffusionXLPipeline" if version == "xl" else "StableDiffusionXLImg2ImgPipeline",
                 "_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": [None, None],
                 "image_encoder": [None, None], "text_encoder": [None, None], "tokenizer": [None, None],
                 "scheduler": ["diffusers", ckpt.scheduler.get("_class_name", "EulerDiscreteScheduler")],
                 **sdxl_flags(version, ckpt.info)}
    if version == "sd3":
        index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 "text_encoder_3": [None, None], "tokenizer_3": [None, None],
                 "scheduler": ["diffusers", ckpt.scheduler.get("_class_name", FLOW_SCHEDULER)]}
    for name, sd in ckpt.parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        config = with_class(name, ckpt.configs[name])
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        weights = "model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_file({k: t.contiguous() for k, t in sd.items()}, folder / name / weights)
        library, cls = PART_CLASSES[name]
        index[name] = [library, (config.get("architectures") or [cls])[0] if library == "transformers" else cls]
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": PART_CLASSES["scheduler"][1], **ckpt.scheduler, "_diffusers_version": DIFFUSERS_VERSION}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    # SD 2.x and SDXL's bigG tokenizer pad with "!", SD 1.x and SDXL's CLIP ViT-L one with the end-of-text token
    tokenizers = [("tokenizer", ckpt.tokenizer_dir, "!" if version == "v2" else EOS),
                  ("tokenizer_2", ckpt.tokenizer_2_dir, "!")]
    for name, source, pad in tokenizers:
        if source is not None:
            save_tokenizer(Path(source), folder / name, pad)
            index[name] = PART_CLASSES[name]
    if ckpt.tokenizer_3_dir is not None and "text_encoder_3" in ckpt.parts:
        shutil.copytree(ckpt.tokenizer_3_dir, folder / "tokenizer_3", dirs_exist_ok=True)
        index["tokenizer_3"] = PART_CLASSES["tokenizer_3"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def with_class(part: str, config: dict) -> dict:
    """A config dict with the class names diffusers / transformers expect in config.json."""
    if part.startswith("text_encoder"):
        return {"architectures": [PART_CLASSES[part][1]], "model_type": "clip_text_model", **config}
    return {"_class_name": PART_CLASSES[part][1], "_diffusers_version": DIFFUSERS_VERSION, **config}


def has_tokenizer(folder: Path) -> bool:
    """A CLIP BPE tokenizer: vocab.json + merges.txt, or the tokenizer.json transformers 5 writes."""
    return (folder / "tokenizer.json").is_file() or all((folder / name).is_file() for name in TOKENIZER_FILES[:2])


def save_tokenizer(source: Path, target: Path, pad_token: str) -> None:
    """Copy a CLIP BPE tokenizer's files and write its tokenizer_config.json with `pad_token`."""
    if not has_tokenizer(source):
        raise NanoDiffusionError(f"{source}: no vocab.json + merges.txt; pass a folder with the CLIP tokenizer files")
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token, "do_lower_case": True}
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_single_file(ckpt: Checkpoint, path: str | Path) -> None:
    """Write an original-layout .safetensors file; our configs ride along in its metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise NanoDiffusionError(f"{path}: single files are written as .safetensors only; use that extension")
    sd = diffusers_to_original(ckpt.parts, open_clip=ckpt.info.get("version") == "v2" or None)
    metadata = {METADATA_KEY: json.dumps({**ckpt.configs, "scheduler": ckpt.scheduler})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in sd.items()}, path, metadata=metadata)


# ---- Hash, info, convert ----

def model_hash(path: str | Path) -> str:
    """The web UI's "Model hash": the first 10 hex digits of the file's sha256 (a folder: its UNet weights, SD3's
    transformer weights), remembered between runs (file_hashes.py)."""
    path = Path(path)
    if path.is_dir():
        path = part_weights(path / ("transformer" if (path / "transformer").is_dir() else "unet"))
    return file_sha256(path)[:10]


def describe(path: str | Path) -> dict:
    """What a checkpoint holds, for `nanodiff info`: format, version, inpainting, prediction type and why,
    parameters, dtype, hash."""
    ckpt = load_checkpoint(path, keep_dtype=True)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for sd in ckpt.parts.values() for t in sd.values())
    settle_prediction(ckpt)
    return {**ckpt.info, "parameters": {name: sum(t.numel() for t in sd.values()) for name, sd in ckpt.parts.items()},
            "dtype": dtypes.most_common(1)[0][0], "hash": model_hash(path)}


def convert(source: str | Path, destination: str | Path, *, prediction: str | None = None,
            tokenizer: str | Path | None = None) -> None:
    """Convert a checkpoint: to a diffusers folder, or (destination ending in .safetensors) to one original file.
    The output is written next to the destination and renamed into place when complete; it may not be the input."""
    from .files import atomic_output, same_location

    destination = Path(destination)
    if same_location(Path(source), destination):
        raise NanoDiffusionError(f"the output {destination} is the input {source}: converting in place would "
                                 "overwrite it; pass another output path")
    ckpt = load_checkpoint(source, prediction=prediction)
    settle_prediction(ckpt)
    if tokenizer is not None:
        ckpt.tokenizer_dir = Path(tokenizer)
    single = destination.suffix in PICKLE_SUFFIXES + (".safetensors",)
    if single and destination.suffix != ".safetensors":
        raise NanoDiffusionError(f"{destination}: single files are written as .safetensors only; use that extension")
    with atomic_output(destination) as tmp:
        if single:
            save_single_file(ckpt, tmp)
        else:
            save_diffusers(ckpt, tmp)
