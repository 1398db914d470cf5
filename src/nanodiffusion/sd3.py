"""SD3's text conditioning (Esser et al. 2024, sec. 5.2 and fig. 2): three text encoders feed the MMDiT.

CLIP-L and CLIP-G give their penultimate hidden states (77 tokens each, side by side on the features, zero-padded
to the T5 width) and their projected pooled outputs (concatenated: the pooled vector the adaLN modulation sees);
T5-XXL's encoder gives 256 more tokens, appended on the sequence axis, or zeros when the model is run without T5
(sec. 5.3.3 trains with each encoder dropped, so T5 is optional at inference). The numbers are those of diffusers'
StableDiffusion3Pipeline.encode_prompt; the MMDiT takes them as `mmdit(x, t, context, pooled_projections=...)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models.clip import CLIPTextModelWithProjection
from .models.t5 import T5_MAX_LENGTH, T5EncoderModel

DEFAULTS = {"default_steps": 28, "default_sampler": "euler"}   # diffusers' SD3 pipeline call (its cfg: 7, ours too)
# What a single file does not say, as Stability's diffusers folders give it: the 16-channel VAE's latent scale and
# shift, the transformer's default size (128 latents: 1024 px), and the shifted rectified-flow schedule.
VAE_SETTINGS = {"sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SAMPLE_SIZE = 128
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def clip_states(encoder: CLIPTextModelWithProjection, ids: Tensor, state: int) -> tuple[Tensor, Tensor]:
    """(hidden state `state` [B, 77, D] (-2: the penultimate layer, before the final LayerNorm), projected pooled
    output [B, projection_dim]) of one CLIP encoder."""
    states = encoder.hidden_states(ids)
    return states[state], encoder.text_embeds(states[-1], ids)


def t5_states(encoder: T5EncoderModel | None, ids: Tensor | None, batch: int, width: int) -> Tensor:
    """T5's last hidden states [B, 256, d_model], or zeros [B, 256, joint_attention_dim] without T5."""
    if encoder is None:
        return torch.zeros(batch, T5_MAX_LENGTH, width)
    return encoder(ids)


def encode_text(text_encoder: CLIPTextModelWithProjection, text_encoder_2: CLIPTextModelWithProjection,
                text_encoder_3: T5EncoderModel | None, ids: Tensor, ids_2: Tensor, ids_3: Tensor | None,
                joint_attention_dim: int, *, state: int = -2) -> tuple[Tensor, Tensor]:
    """(context [B, 77 + 256, joint_attention_dim], pooled [B, D_L + D_G]) for the token ids of the three tokenizers
    (ids_3 None without T5)."""
    states, pooled = clip_states(text_encoder, ids, state)
    states_2, pooled_2 = clip_states(text_encoder_2, ids_2, state)
    t5 = t5_states(text_encoder_3, ids_3, len(ids), joint_attention_dim).to(states)
    clip = torch.cat([states, states_2], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([pooled, pooled_2], dim=-1)
