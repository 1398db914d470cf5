"""SDXL's conditioning (Podell et al. 2023): the two text encoders' penultimate hidden states side by side as the
cross-attention context, the pooled bigG projection and the size / crop "time ids" as the UNet's added
conditioning (§2.1, §2.2), and the refiner's aesthetic score (§2.5).

The numbers are those of diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids, so an SDXL
checkpoint sees the same inputs here as there. The UNet takes them as `unet(x, t, context, text_embeds=...,
time_ids=...)` (models/unet.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import NanoDiffusionError
from .models.clip import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .prompts import Tokenizer, encode_weighted

DEFAULT_SIZE = 1024                       # SDXL's training resolution: images of about 1024 x 1024 pixels
REFINER_AESTHETIC_SCORE = (6.0, 2.5)      # diffusers' defaults: positive, negative
SCALING_FACTOR = 0.13025                  # the SDXL VAE's latent scale (SD 1.x / 2.x: 0.18215)
VAE_SETTINGS = {"sample_size": DEFAULT_SIZE, "scaling_factor": SCALING_FACTOR, "force_upcast": True}


class SDXLConditioning(NamedTuple):
    """One branch of classifier-free guidance: the UNet's keyword inputs besides x and t."""

    context: Tensor        # [B, 77, 768 + 1280]: CLIP ViT-L and OpenCLIP bigG penultimate states (refiner: bigG only)
    text_embeds: Tensor    # [B, 1280]: bigG's projected pooled output
    time_ids: Tensor       # [B, 6]: original size, crop top-left, target size (refiner [B, 5]: ..., aesthetic score)


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's micro-conditioning (§2.2): the size the training image had before resizing, the top-left corner of its
    crop, the size generated; sizes are (height, width). The refiner (§2.5) replaces the target size with an
    aesthetic score."""

    original_size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)
    target_size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)
    crops_coords_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float | None = None

    def values(self) -> list[float]:
        """The time ids: (h, w, top, left, target h, target w), or (h, w, top, left, score) for the refiner."""
        last = (self.aesthetic_score,) if self.aesthetic_score is not None else tuple(self.target_size)
        return [*self.original_size, *self.crops_coords_top_left, *last]

    def time_ids(self, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
        """The time ids [batch, 6] (refiner: [batch, 5]) as the UNet takes them."""
        return torch.tensor([self.values()], dtype=dtype, device=device).repeat(batch, 1)

    def negative(self) -> MicroConditioning:
        """The unconditional branch's micro-conditioning by default: the same, but the refiner's low aesthetic
        score (diffusers' negative_aesthetic_score)."""
        if self.aesthetic_score is None:
            return self
        return replace(self, aesthetic_score=REFINER_AESTHETIC_SCORE[1])


def encode_text(text_encoder: CLIPTextModel | None, text_encoder_2: CLIPTextModelWithProjection,
                ids: Tensor | None, ids_2: Tensor, *, state: int = -2) -> tuple[Tensor, Tensor]:
    """(context, pooled) for token ids of both tokenizers (§2.1): each encoder's hidden state `state` (-2: the
    penultimate layer, without the final LayerNorm) concatenated along the features, and bigG's projected pooled
    output. The refiner has no first encoder (text_encoder and ids None)."""
    if (text_encoder is None) != (ids is None):
        raise NanoDiffusionError("give token ids for the first text encoder exactly when there is one (the SDXL "
                                 "refiner has only the second)")
    states, pooled = encoder_states(text_encoder, text_encoder_2, ids, ids_2, state)
    return torch.cat(states, dim=-1), pooled


def encoder_states(text_encoder: CLIPTextModel | None, text_encoder_2: CLIPTextModelWithProjection,
                   ids: Tensor | None, ids_2: Tensor, state: int) -> tuple[list[Tensor], Tensor]:
    """Each encoder's hidden state `state` (the first encoder's, when there is one, then bigG's) and bigG's
    projected pooled output."""
    states_2 = text_encoder_2.hidden_states(ids_2)
    pooled = text_encoder_2.text_embeds(states_2[-1], ids_2)
    return ([] if text_encoder is None else [text_encoder.hidden_states(ids)[state]]) + [states_2[state]], pooled


def encode_prompts(text_encoder: CLIPTextModel | None, text_encoder_2: CLIPTextModelWithProjection,
                   tokenizer: Tokenizer, tokenizer_2: Tokenizer, texts: list[str], *, state: int = -2
                   ) -> tuple[Tensor, Tensor]:
    """(context, pooled) for prompts with the web UI's syntax: emphasis weights, chunks of 75 tokens, BREAK
    (prompts.encode_weighted): each encoder's states weighted on their own, the chunks' states concatenated along
    the tokens, bigG's pooled output from the first chunk. A plain prompt of up to 75 tokens is encode_text of its
    token ids, as diffusers encodes it. The refiner (text_encoder None) uses bigG and its tokenizer alone."""
    def encode(ids: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        return encoder_states(text_encoder, text_encoder_2, *([None, *ids] if text_encoder is None else ids), state)

    tokenizers = [tokenizer_2] if text_encoder is None else [tokenizer, tokenizer_2]
    return encode_weighted(encode, tokenizers, texts)


def sdxl_conditioning(text_encoder: CLIPTextModel | None, text_encoder_2: CLIPTextModelWithProjection,
                      ids: tuple[Tensor | None, Tensor], micro: MicroConditioning, *,
                      negative_ids: tuple[Tensor | None, Tensor] | None = None,
                      negative_micro: MicroConditioning | None = None, force_zeros_for_empty_prompt: bool = True,
                      clip_skip: int = 1) -> tuple[SDXLConditioning, SDXLConditioning]:
    """The conditional and unconditional UNet inputs for the prompt's token ids (one row per image, both
    tokenizers) and the micro-conditioning, as diffusers' SDXL pipelines build them: without a negative prompt
    (negative_ids None) the unconditional context and pooled embedding are zeros when force_zeros_for_empty_prompt
    (the base model's setting; the refiner's is False: then the empty prompt's ids must be given). clip_skip=2 reads
    the layer before the penultimate (diffusers' clip_skip=1); as in diffusers, only for the prompt, never the
    negative. negative_micro defaults to micro (the refiner's negative aesthetic score must be given there)."""
    if clip_skip < 1:
        raise NanoDiffusionError(f"clip skip {clip_skip} is out of range: use 1 (the penultimate layer) or more")
    context, pooled = encode_text(text_encoder, text_encoder_2, *ids, state=-(clip_skip + 1))
    batch = context.shape[0]
    cond = SDXLConditioning(context, pooled, micro.time_ids(batch, context.dtype, context.device))
    negative_time_ids = (negative_micro or micro.negative()).time_ids(batch, context.dtype, context.device)
    if negative_ids is None:
        if not force_zeros_for_empty_prompt:
            raise NanoDiffusionError("this model encodes the empty negative prompt (force_zeros_for_empty_prompt is "
                                     "off): pass the token ids of \"\" as negative_ids")
        return cond, SDXLConditioning(torch.zeros_like(context), torch.zeros_like(pooled), negative_time_ids)
    negative_context, negative_pooled = encode_text(text_encoder, text_encoder_2, *negative_ids)
    if negative_context.shape != context.shape:
        raise NanoDiffusionError(f"the negative prompt's {tuple(negative_context.shape)} text states do not match "
                                 f"the prompt's {tuple(context.shape)}: tokenize both to the same batch and length")
    return cond, SDXLConditioning(negative_context, negative_pooled, negative_time_ids)


def vae_config(*, fp16_fix: bool = False) -> dict:
    """The SDXL VAE's config.json: SD's autoencoder with a 0.13025 latent scale; diffusers runs it in float32
    (force_upcast), while the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix, same weights' shapes) runs in half
    precision."""
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            **VAE_SETTINGS, "force_upcast": not fp16_fix}


def scheduler_config() -> dict:
    """SDXL's scheduler_config.json: SD's scaled-linear betas with Euler and "leading" timestep spacing."""
    return {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "interpolation_type": "linear", "use_karras_sigmas": False, "steps_offset": 1,
            "timestep_spacing": "leading", "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
            "sample_max_value": 1.0}


@dataclass
class SDXLModels:
    """A loaded SDXL checkpoint (loading.load_sdxl): the networks, both tokenizers and the pipeline settings."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None                # CLIP ViT-L; None for the refiner
    text_encoder_2: CLIPTextModelWithProjection       # OpenCLIP ViT-bigG
    tokenizer: CLIPTokenizer | None                   # pads with the end-of-text token; None for the refiner
    tokenizer_2: CLIPTokenizer                        # pads with "!" (id 0)
    scheduler: dict                                   # scheduler_config.json
    info: dict                                        # version, format, path, inpainting, the SDXL pipeline flags

    @property
    def refiner(self) -> bool:
        """The refiner: bigG only, aesthetic-score time ids (§2.5)."""
        return self.text_encoder is None

    def micro_conditioning(self, height: int, width: int) -> MicroConditioning:
        """diffusers' defaults for a height x width image: original and target size = the image size, no crop; the
        refiner's aesthetic score 6."""
        score = REFINER_AESTHETIC_SCORE[0] if self.info.get("requires_aesthetics_score") else None
        return MicroConditioning((height, width), (height, width), aesthetic_score=score)
