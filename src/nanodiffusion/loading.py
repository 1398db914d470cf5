"""Build a Pipeline from a checkpoint on disk: the built-in model, a diffusers folder or a single file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .allocator import fix_mmap_threshold
from .checkpoints import Checkpoint, load_checkpoint, load_into, model_hash, read_json, settle_prediction
from .errors import NanoDiffusionError
from .flow_schedule import FlowSchedule
from .memory import check_memory
from .models.clip import EOS, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from .models.layout import LayoutConfig, LayoutModel
from .models.mmdit import MMDiTConfig, SD3Transformer2DModel
from .models.t5 import T5Config, T5EncoderModel, T5Tokenizer
from .models.tokenizers import load_tokenizer
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .precision import precision_dtype, set_precision
from .schedules import NoiseSchedule
from .sd3 import DEFAULTS as SD3_DEFAULTS
from .sdxl import SDXLModels
from .storage import store_weights, uninitialised
from .storage import weights_dtype as parse_weights_dtype

BUILTIN = Path(__file__).parent / "weights" / "builtin"
FEW_STEP_DEFAULTS = {"default_steps": 4, "default_sampler": "lcm"}   # a folder whose scheduler is LCMScheduler
NAMED_MODELS = {"builtin": BUILTIN, "builtin-lcm": BUILTIN.with_name("builtin_lcm")}   # --model NAME: shipped models
T = TypeVar("T")
SETTING_TYPES = {"name": str, "default_size": int, "clip_skip": int, "default_cfg": (int, float),
                 "default_layout_cfg": (int, float)}


def build_models(ckpt: Checkpoint, dtype: torch.dtype = torch.float32
                 ) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, LayoutModel | None]:
    """Instantiate the networks (the layout model where the checkpoint has one) from their configs and load their
    weights (strict), with the conv / linear weights stored in `dtype` (storage.py); see build_network."""
    networks = {"unet": (UNetConfig, UNet2DConditionModel), "vae": (VAEConfig, AutoencoderKL),
                "text_encoder": (CLIPTextConfig, CLIPTextModel), "layout": (LayoutConfig, LayoutModel)}
    return tuple(build_network(ckpt, part, *classes, dtype) if part in ckpt.parts else None
                 for part, classes in networks.items())


def from_config(build: Callable[[dict], T], config: dict, part: str) -> T:
    """build(config) for a config read from the checkpoint; a value of the wrong type there is one clear line."""
    try:
        return build(config)
    except (TypeError, AttributeError, KeyError, IndexError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise NanoDiffusionError(f"the model's {part} config holds a value of the wrong type ({detail}); fix it "
                                 "or convert the model again") from None


def nanodiffusion_settings(folder: Path) -> dict:
    """Our own defaults stored in model_index.json under "_nanodiffusion" (diffusers ignores "_" keys)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    settings = read_json(index).get("_nanodiffusion", {})
    if not isinstance(settings, dict) or any(
            key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], kind))
            for key, kind in SETTING_TYPES.items()):
        raise NanoDiffusionError(f"{index}: not a model index with a \"_nanodiffusion\" object of name (text), "
                                 "default_size and clip_skip (integers), default_cfg and default_layout_cfg "
                                 "(numbers)")
    return settings


def load_pipeline(cls: type, path: str | Path | None = None, *, tokenizer: str | Path | None = None,
                  prediction: str | None = None, weights_dtype: str | torch.dtype | None = None,
                  precision: str | None = None, t5: bool | None = None):
    """Read a checkpoint, build its networks, tokenizer and noise schedule into `cls` (a Pipeline); the conv /
    linear weights are stored in `weights_dtype` (None: float32; see storage.py), or converted once to the
    compute `precision` when that is bfloat16 (precision.py); `t5` as choose_t5 says (None: the model's own)."""
    dtype = parse_weights_dtype(weights_dtype)
    fix_mmap_threshold()   # big activations go back to the kernel when freed (allocator.py)
    source = BUILTIN if path is None else NAMED_MODELS.get(str(path), Path(path))
    if path is None and not (BUILTIN / "model_index.json").is_file():
        raise NanoDiffusionError(f"the built-in model is missing from {BUILTIN}: reinstall nanodiffusion "
                                 "or pass --model PATH")
    if not source.exists():
        raise NanoDiffusionError(f"model {source} does not exist: pass a diffusers folder or a "
                                 ".safetensors / .ckpt file")
    ckpt = load_checkpoint(source, prediction=prediction, keep_dtype=True)
    version = ckpt.info.get("version")
    if t5 is not None:
        choose_t5(ckpt, t5)
    network = "transformer" if version == "sd3" else "unet"
    compute = precision_dtype(precision, sum(t.numel() for t in ckpt.parts[network].values()))
    check_memory(ckpt.parts, compute, dtype)
    extra = {}   # the Pipeline's fields only some families have (second / third text encoders, SDXL flags)
    if version in ("xl", "xl-refiner"):
        models = sdxl_models(ckpt, dtype)
        unet, vae, text_encoder, layout = models.unet, models.vae, models.text_encoder, None
        extra = {"text_encoder_2": models.text_encoder_2, "tokenizer_2": models.tokenizer_2,
                 "force_zeros_for_empty_prompt": bool(ckpt.info.get("force_zeros_for_empty_prompt", True)),
                 "aesthetic_score": models.micro_conditioning(1, 1).aesthetic_score}
    elif version == "sd3":
        unet, vae, text_encoder, extra = sd3_models(ckpt, dtype)
        layout = None
    else:
        unet, vae, text_encoder, layout = build_models(ckpt, dtype)
    first_encoder = text_encoder if text_encoder is not None else extra["text_encoder_2"]   # the refiner: bigG
    set_precision(unet, vae, first_encoder, compute)
    settle_prediction(ckpt, unet)
    schedule_cls = FlowSchedule if ckpt.info["prediction"] == "flow" else NoiseSchedule
    schedule = from_config(schedule_cls.from_config, ckpt.scheduler, "scheduler")
    if ckpt.info.get("inferred") and version == "v2" and prediction is None:
        warnings.warn(f"{source.name}: prediction type {ckpt.info['prediction']} ({ckpt.info['prediction_from']})"
                      "; --prediction overrides it", stacklevel=3)
    pad = "!" if version == "v2" and tokenizer is None and ckpt.tokenizer_dir is None else None
    tok = (models.tokenizer or models.tokenizer_2 if version in ("xl", "xl-refiner") and tokenizer is None
           else load_tokenizer(tokenizer or ckpt.tokenizer_dir, pad_with=pad))
    tok.model_max_length = min(tok.model_max_length, first_encoder.config.max_position_embeddings)
    settings = nanodiffusion_settings(source) if source.is_dir() else {}
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        return cls(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok, layout=layout,
            schedule=schedule,
            prediction=ckpt.info["prediction"],
            name=settings.get("name", source.stem if source.is_file() else source.name),
            model_hash=model_hash(source),
            default_size=settings.get("default_size", ckpt.configs[network].get("sample_size", 64) * vae_scale),
            default_cfg=settings.get("default_cfg", 7.0),
            default_layout_cfg=settings.get("default_layout_cfg"),
            **(FEW_STEP_DEFAULTS if ckpt.scheduler.get("_class_name") == "LCMScheduler" else {}),
            **(SD3_DEFAULTS if version == "sd3" else {}),
            clip_skip=settings.get("clip_skip", 1), precision=str(compute).removeprefix("torch."), **extra,
        )


def build_network(ckpt: Checkpoint, part: str, config_cls: type, model_cls: type,
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One network of the checkpoint from its config, its weights loaded (strict). It is built uninitialised
    (storage.uninitialised) and takes the checkpoint's tensors as its parameters, which leave `ckpt`; store_weights
    then copies them into memory in their storage dtype one by one, so loading never holds a second copy."""
    with uninitialised():
        model = from_config(lambda config: model_cls(config_cls.from_dict(config)), ckpt.configs[part], part)
    load_into(model, ckpt.parts.pop(part), part, assign=True)
    return store_weights(model.eval().requires_grad_(False), dtype)


def load_sdxl(path: str | Path, *, weights_dtype: str | torch.dtype | None = None) -> SDXLModels:
    """An SDXL base, inpainting or refiner checkpoint (diffusers folder or original single file): its UNet, VAE,
    text encoders (CLIP ViT-L, absent in the refiner, and OpenCLIP bigG with its projection), tokenizers (the
    folder's, else the bundled CLIP vocabulary: ViT-L padding with the end token, bigG with "!"), scheduler config
    and pipeline flags."""
    source = Path(path)
    if not source.exists():
        raise NanoDiffusionError(f"model {source} does not exist: pass an SDXL diffusers folder or single file")
    return sdxl_models(load_checkpoint(source, keep_dtype=True), parse_weights_dtype(weights_dtype))


def sdxl_models(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> SDXLModels:
    """The networks and tokenizers of a loaded SDXL checkpoint (see load_sdxl)."""
    version = ckpt.info.get("version")
    if "text_encoder_2" not in ckpt.parts or "vae" not in ckpt.parts:
        raise NanoDiffusionError(f"{ckpt.info.get('path', 'the model')}: not a complete SDXL checkpoint (version "
                                 f"{version}; it needs text_encoder_2 (OpenCLIP bigG) and a VAE)")
    refiner = "text_encoder" not in ckpt.parts
    text_encoder = None if refiner else build_network(ckpt, "text_encoder", CLIPTextConfig, CLIPTextModel, dtype)
    tokenizer = None if refiner else load_tokenizer(ckpt.tokenizer_dir, pad_with=None if ckpt.tokenizer_dir else EOS)
    return SDXLModels(
        unet=build_network(ckpt, "unet", UNetConfig, UNet2DConditionModel, dtype),
        vae=build_network(ckpt, "vae", VAEConfig, AutoencoderKL, dtype),
        text_encoder=text_encoder,
        text_encoder_2=build_network(ckpt, "text_encoder_2", CLIPTextConfig, CLIPTextModelWithProjection, dtype),
        tokenizer=tokenizer,
        tokenizer_2=load_tokenizer(ckpt.tokenizer_2_dir, pad_with=None if ckpt.tokenizer_2_dir else "!"),
        scheduler=ckpt.scheduler, info=ckpt.info)


def choose_t5(ckpt: Checkpoint, t5: bool) -> None:
    """SD3's optional T5 encoder as asked: dropped (False: less memory, the prompt's T5 tokens are zeros) or required
    (True: a model without it is one clear line)."""
    name = Path(ckpt.info["path"]).name
    if t5 and ckpt.info.get("version") != "sd3":
        raise NanoDiffusionError(f"{name} is not an SD3 model (version {ckpt.info.get('version')}): it has no T5 "
                                 "text encoder to use")
    if t5 and "text_encoder_3" not in ckpt.parts:
        where = "text_encoder_3/" if ckpt.info.get("format") == "diffusers" else "text_encoders.t5xxl."
        raise NanoDiffusionError(f"{name} has no T5 text encoder (no {where}): load it without T5, or use an SD3 "
                                 "folder or file that includes T5")
    if not t5:
        ckpt.parts.pop("text_encoder_3", None)


def sd3_models(ckpt: Checkpoint, dtype: torch.dtype = torch.float32
               ) -> tuple[SD3Transformer2DModel, AutoencoderKL, CLIPTextModelWithProjection, dict]:
    """The networks of a loaded SD3 / SD3.5 folder or single file (Esser et al. 2024): the MMDiT, the 16-channel VAE,
    CLIP-L, and as the Pipeline's other fields CLIP-G with its tokenizer and T5's encoder with its tokenizer (None
    when the model has no T5: it runs without)."""
    check_sd3_parts(ckpt)
    t5 = "text_encoder_3" in ckpt.parts
    extra = {
        "text_encoder_2": build_network(ckpt, "text_encoder_2", CLIPTextConfig, CLIPTextModelWithProjection, dtype),
        "tokenizer_2": load_tokenizer(ckpt.tokenizer_2_dir, pad_with=None if ckpt.tokenizer_2_dir else "!"),
        "text_encoder_3": build_network(ckpt, "text_encoder_3", T5Config, T5EncoderModel, dtype) if t5 else None,
        "tokenizer_3": T5Tokenizer.from_folder(ckpt.tokenizer_3_dir or ckpt.info["path"]) if t5 else None}
    return (build_network(ckpt, "transformer", MMDiTConfig, SD3Transformer2DModel, dtype),
            build_network(ckpt, "vae", VAEConfig, AutoencoderKL, dtype),
            build_network(ckpt, "text_encoder", CLIPTextConfig, CLIPTextModelWithProjection, dtype), extra)


def check_sd3_parts(ckpt: Checkpoint) -> None:
    """An SD3 model needs a VAE, CLIP-L and CLIP-G (T5 is optional): a folder or single file without them, or a single
    file with T5 but no T5 tokenizer beside it (no file holds one), is one clear line saying what to do."""
    name = Path(ckpt.info["path"]).name
    missing = [part for part in ("vae", "text_encoder", "text_encoder_2") if part not in ckpt.parts]
    if ckpt.info.get("format") == "diffusers":
        if missing:
            raise NanoDiffusionError(f"{name}: not a complete SD3 folder (no {', '.join(missing)}/); it needs a VAE, "
                                     "CLIP-L and CLIP-G, and T5 optionally")
        return
    names = {"vae": "VAE (first_stage_model.)", "text_encoder": "CLIP-L (text_encoders.clip_l.)",
             "text_encoder_2": "CLIP-G (text_encoders.clip_g.)"}
    if missing:
        raise NanoDiffusionError(f"{name} has no {', no '.join(names[part] for part in missing)}: SD3 needs a VAE and "
                                 "both CLIP-L and CLIP-G text encoders (T5 optionally); use a file that includes them "
                                 "(such as sd3_medium_incl_clips.safetensors) or a diffusers folder")
    if "text_encoder_3" in ckpt.parts and ckpt.tokenizer_3_dir is None:
        raise NanoDiffusionError(f"{name} holds T5-XXL but no file holds its tokenizer: put T5's tokenizer.json in a "
                                 "tokenizer_3/ folder beside the file, or load it without T5 (--no-t5)")
