"""The built-in model as the lessons call it: loaded once, and its text-conditioned denoiser for lessons that run
their own sampling loop (DDIM inversion, classifier guidance)."""

from __future__ import annotations

import torch

from ..denoisers import Denoiser
from ..guidance import cfg_denoiser
from ..pipeline import Pipeline


def load() -> Pipeline:
    """The built-in model (whatever the package ships)."""
    return Pipeline.load()


def text_denoiser(pipe: Pipeline, prompts: list[str], cfg: float, seed: int = 0):
    """D(x, sigma) of the pipeline's UNet for these prompts, guided at scale cfg against the empty prompt, with the
    conditioning Pipeline.generate builds (context, and the layout stage when the model has one)."""
    cond, uncond = pipe.encode_text(prompts, [""] * len(prompts), pipe.clip_skip)
    size = pipe.default_size
    net = pipe.unet_function(None, 1.0, size, size)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    cond, uncond = pipe.guidance_inputs(cond, uncond, generators, size // pipe.vae_scale, size // pipe.vae_scale)
    return cfg_denoiser(Denoiser(net, pipe.schedule, pipe.prediction), cond, uncond, cfg)


def token_labels(tokenizer, text: str) -> list[tuple[int, str]]:
    """(context position, token text) of a prompt's tokens: position 0 is the start token, words follow."""
    ids = tokenizer.encode(text)
    names = getattr(tokenizer, "tokens", None)
    decoder = getattr(tokenizer, "decoder", {})
    return [(i + 1, names[t] if names else decoder.get(t, str(t)).replace("</w>", ""))
            for i, t in enumerate(ids[: tokenizer.model_max_length - 2])]
