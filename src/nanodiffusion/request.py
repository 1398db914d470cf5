"""A generation request: every setting of one txt2img / img2img / inpaint call, checked in one place.

`Pipeline(...)` builds one from keyword arguments (ours, or the names diffusers users type: num_inference_steps,
guidance_scale, generator, image, mask_image, ...), `GenerationRequest.resolved` fills the model's defaults and
rejects what cannot run with one clear line, and the pipeline samples from the resolved request. The result is a
list of images that also answers `.images`, like a diffusers pipeline output.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .errors import NanoDiffusionError
from .fast import FastOptions
from .prompts import check_prompt
from .samplers import check_eta, get_sampler

MAX_BATCH = 64
MAX_N_ITER = 100
MAX_SIDE = 2048
MAX_SEED = 2**64   # torch.Generator.manual_seed takes seeds below 2^64
UPSCALERS = ("latent", "latent-nearest", "lanczos")

DIFFUSERS_NAMES = {   # diffusers' keyword -> ours
    "num_inference_steps": "steps", "guidance_scale": "cfg", "num_images_per_prompt": "batch",
    "image": "init_image", "mask_image": "mask", "controlnet_conditioning_scale": "control_scale",
}


@dataclass
class HiresFix:
    """Hires fix: sample at the request's size, upscale by `scale` (or to width x height), then an img2img pass."""

    scale: float = 2.0
    steps: int = 0             # second-pass steps; 0: the first pass's
    strength: float = 0.7      # the second pass's denoising strength
    upscaler: str = "latent"   # "latent" (bilinear latents), "latent-nearest", "lanczos" (pixels, re-encoded)
    width: int = 0             # target size; 0: the first pass's size x scale
    height: int = 0

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size, to multiples of 8: both given, one given (aspect kept), or scale x."""
        if self.width and self.height:
            w, h = self.width, self.height
        elif self.width or self.height:
            factor = self.width / width if self.width else self.height / height
            w, h = round(width * factor), round(height * factor)
        else:
            w, h = round(width * self.scale), round(height * self.scale)
        return w // 8 * 8, h // 8 * 8


@dataclass
class GenerationRequest:
    """One generation: `batch` images per iteration, `n_iter` iterations, seeds seed, seed + 1, ..."""

    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    steps: int | None = None            # None: the model's default (20; 4 for a few-step model)
    sampler: str | None = None          # None: the model's default ("euler_a"; "lcm" for a few-step model)
    schedule: str = "default"
    cfg: float | None = None            # None: the model's default
    layout_cfg: float | None = None     # a layout model's map guidance (guidance.LayoutGuidance); None: its default
    seed: int | None = None             # None or < 0: a random seed
    width: int | None = None            # None: the model's default size (init images are scaled to it)
    height: int | None = None
    batch: int = 1
    n_iter: int = 1                     # batch count: iterations of `batch` images each
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None
    mask_only: bool = False             # inpaint the masked area only, at full resolution (inpaint_region.py)
    mask_padding: int = 32              # pixels around the mask that mask_only keeps as context
    eta: float | None = None
    clip_skip: int | None = None
    control_image: Image.Image | None = None
    control_scale: float = 1.0
    subseed: int | None = None          # variation seed (noise = slerp(subseed_strength, seed noise, subseed noise))
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None   # (width, height) the seed's noise is drawn at, then centred
    hires: HiresFix | None = None
    refiner: Any = None                 # a Pipeline (the SDXL refiner) that runs the last part of the schedule
    refiner_switch_at: float = 0.8      # the fraction of the schedule the base model runs (diffusers' denoising_end)
    tiling: bool = False                # seamless: circular padding in every convolution
    loras: list[tuple[Path, float]] = field(default_factory=list)   # in addition to the pipeline's own
    fast: FastOptions | None = None     # None: the pipeline's
    controlnet: torch.nn.Module | None = None   # None: the pipeline's
    callback: Callable[[int, int, torch.Tensor], None] | None = None   # (step, total, x0 estimate)
    step_callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None
    progress: bool = False

    @classmethod
    def from_kwargs(cls, prompt: Any = None, negative_prompt: Any = None, **kwargs: Any) -> GenerationRequest:
        """A request from keyword arguments: ours, or diffusers' names (num_inference_steps, guidance_scale,
        num_images_per_prompt, generator, image, mask_image, callback_on_step_end, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            ours = DIFFUSERS_NAMES.get(key, key)
            if key == "generator":
                values["seed"] = generator_seed(value)
            elif key == "guidance_scale" and "cfg" not in values:   # diffusers guides only above 1: below, cond only
                values["cfg"] = 1.0 if isinstance(value, (int, float)) and value <= 1 else value
            elif key == "callback_on_step_end":
                values["step_callback"] = diffusers_step_callback(value)
            elif key == "output_type":
                if value != "pil":
                    raise NanoDiffusionError(f"output_type {value!r} is not supported: images come back as PIL")
            elif ours not in names:
                raise NanoDiffusionError(f"unknown generation setting {key!r}: see `help(GenerationRequest)` for "
                                         "the settings a pipeline takes")
            else:
                if ours in values:
                    raise NanoDiffusionError(f"{key!r} and another name for {ours!r} are both given: pass one")
                values[ours] = value
        if prompt is None:
            raise NanoDiffusionError("no prompt given: pass a prompt (an empty string for an unconditional image)")
        return cls(prompt=prompt, negative_prompt="" if negative_prompt is None else negative_prompt, **values)

    def prompts(self) -> tuple[list[str], list[str]]:
        """The batch's prompts and negative prompts, one each per image (a single string is repeated)."""
        prompts = [self.prompt] * self.batch if isinstance(self.prompt, str) else list(self.prompt)
        negatives = ([self.negative_prompt] * len(prompts) if isinstance(self.negative_prompt, str)
                     else list(self.negative_prompt))
        if len(negatives) != len(prompts):
            raise NanoDiffusionError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: pass one "
                                     "negative prompt, or one per prompt")
        for text in prompts:
            check_prompt(text, "prompt")
        for text in negatives:
            check_prompt(text, "negative prompt")
        return prompts, negatives

    def resolved(self, pipe: Any) -> GenerationRequest:
        """A copy with the model's defaults filled in, checked: one clear error for anything that cannot run."""
        prompts, negatives = self.prompts()
        batch = len(prompts)
        width, height = default_size(self, pipe)
        cfg = pipe.default_cfg if self.cfg is None else self.cfg
        if not math.isfinite(cfg):
            raise NanoDiffusionError(f"cfg {cfg} is not allowed: use a finite number such as 7")
        layout_cfg = getattr(pipe, "default_layout_cfg", None) if self.layout_cfg is None else self.layout_cfg
        if self.layout_cfg is not None and getattr(pipe, "layout", None) is None:
            raise NanoDiffusionError(f"layout_cfg is for a model with a layout stage (the built-in model); "
                                     f"{pipe.name} has none: leave it out")
        if layout_cfg is not None and not math.isfinite(layout_cfg):
            raise NanoDiffusionError(f"layout_cfg {layout_cfg} is not allowed: use a finite number such as 3")
        check_size(width, height, max(8, pipe.vae_scale))
        check_count("batch", batch, MAX_BATCH)
        check_count("n_iter", self.n_iter, MAX_N_ITER)
        steps = pipe.default_steps if self.steps is None else self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise NanoDiffusionError(f"steps {steps!r} is not allowed: use a whole number of at least 1")
        sampler = pipe.default_sampler if self.sampler is None else self.sampler
        get_sampler(sampler)
        if self.eta is not None:
            check_eta(self.eta)
        controlnet = pipe.controlnet if self.controlnet is None else self.controlnet
        if (controlnet is None) != (self.control_image is None):
            raise NanoDiffusionError("a ControlNet needs a control image and a control image needs a ControlNet: "
                                     "pass both --controlnet FILE and --control-image IMAGE")
        if controlnet is not None and self.mask is not None and pipe.is_inpainting_model:
            raise NanoDiffusionError("ControlNet with a 9-channel inpainting model is not supported: "
                                     "inpaint with an ordinary checkpoint instead")
        fast = pipe.fast if self.fast is None else self.fast
        if fast.deepcache > 1 and controlnet is not None:
            raise NanoDiffusionError("DeepCache with a ControlNet is not supported: turn --deepcache off")
        if self.mask is not None and self.init_image is None:
            raise NanoDiffusionError("a mask needs an init image to inpaint: pass --init IMAGE too")
        if self.mask_only and self.mask is None:
            raise NanoDiffusionError("inpainting the masked area only needs a mask: pass --mask IMAGE too")
        if isinstance(self.mask_padding, bool) or not isinstance(self.mask_padding, int) or self.mask_padding < 0:
            raise NanoDiffusionError(f"mask padding {self.mask_padding!r} is not allowed: use 0 or more pixels")
        if self.init_image is not None and not 0.0 < self.strength <= 1.0:
            raise NanoDiffusionError(f"strength {self.strength} is not allowed: use a value in (0, 1]")
        check_seed("seed", self.seed)
        check_seed("subseed", self.subseed)
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise NanoDiffusionError(f"subseed_strength {self.subseed_strength} is not allowed: use 0 to 1")
        if self.seed_resize_from is not None:
            check_size(*self.seed_resize_from, max(8, pipe.vae_scale))
        if self.hires is not None:
            check_hires(self.hires, width, height, pipe)
        check_refiner(self, pipe)
        seed = random.randrange(2**32) if self.seed is None or self.seed < 0 else self.seed
        subseed = random.randrange(2**32) if self.subseed is None or self.subseed < 0 else self.subseed
        return dataclasses.replace(
            self, prompt=prompts, negative_prompt=negatives, steps=steps, sampler=sampler, batch=batch, width=width,
            height=height, cfg=cfg, layout_cfg=layout_cfg,
            seed=seed, subseed=subseed, clip_skip=self.clip_skip or pipe.clip_skip, controlnet=controlnet,
            fast=fast)


def default_size(request: GenerationRequest, pipe: Any) -> tuple[int, int]:
    """The size asked for, else the model's default size."""
    return (pipe.default_size if request.width is None else request.width,
            pipe.default_size if request.height is None else request.height)


def check_size(width: int, height: int, step: int) -> None:
    """Sizes must be positive multiples of `step` (8 and the VAE factor) and not absurdly large."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % step or value > MAX_SIDE:
            raise NanoDiffusionError(
                f"{name} {value} is not allowed: use a multiple of {step} between {step} and {MAX_SIDE}")


def check_count(name: str, value: int, most: int) -> None:
    """batch / n_iter: a whole number from 1 to `most`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise NanoDiffusionError(f"{name} {value} is not allowed: use 1 to {most}")


def check_seed(name: str, value: int | None) -> None:
    """Seeds are whole numbers below 2^64 (negative: pick one at random)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value >= MAX_SEED):
        raise NanoDiffusionError(f"{name} {value!r} is not allowed: use a whole number below 2^64 (-1: random)")


def check_hires(hires: HiresFix, width: int, height: int, pipe: Any) -> None:
    """The hires fix's upscaler, strength and target size."""
    if hires.upscaler not in UPSCALERS:
        raise NanoDiffusionError(f"hires upscaler {hires.upscaler!r} is unknown: use one of {', '.join(UPSCALERS)}")
    if not 0.0 < hires.strength <= 1.0:
        raise NanoDiffusionError(f"hires strength {hires.strength} is not allowed: use a value in (0, 1]")
    if hires.steps < 0:
        raise NanoDiffusionError(f"hires steps {hires.steps} is not allowed: use 0 (the first pass's) or more")
    if not hires.scale > 0:
        raise NanoDiffusionError(f"hires scale {hires.scale} is not allowed: use a positive factor such as 2")
    check_size(*hires.target(width, height), max(8, pipe.vae_scale))


def check_refiner(request: GenerationRequest, pipe: Any) -> None:
    """A refiner only after a model of the same latent space, at a switch inside (0, 1); a refiner alone only
    refines an init image."""
    refiner = request.refiner
    if refiner is None:
        if getattr(pipe, "is_refiner", False) and request.init_image is None:
            raise NanoDiffusionError(f"{pipe.name} is an SDXL refiner: it refines an image rather than starting one; "
                                     "give it an init image, or load the SDXL base model and pass this one as its "
                                     "refiner (--refiner)")
        return
    if getattr(refiner, "vae", None) is None or refiner.is_sd3 or pipe.is_sd3:
        raise NanoDiffusionError("the refiner must be a loaded SD / SDXL Pipeline of the same family as the model")
    ours, theirs = pipe.vae.config, refiner.vae.config
    if (ours.latent_channels, ours.scaling_factor) != (theirs.latent_channels, theirs.scaling_factor) \
            or pipe.is_sdxl != refiner.is_sdxl:
        raise NanoDiffusionError(f"refiner {refiner.name} works in another latent space than {pipe.name} (one is "
                                 "SDXL, the other not): pass a refiner of the same family")
    if pipe.is_refiner:
        raise NanoDiffusionError(f"{pipe.name} is itself a refiner: load the SDXL base model and pass this one as "
                                 "its refiner")
    if not 0.0 < request.refiner_switch_at < 1.0:
        raise NanoDiffusionError(f"refiner_switch_at {request.refiner_switch_at} is not allowed: use a fraction of "
                                 "the schedule in (0, 1), e.g. 0.8")
    if request.mask is not None or request.hires is not None:
        raise NanoDiffusionError("a refiner with inpainting or the hires fix is not supported: generate, then refine "
                                 "the image with img2img")


def generator_seed(generator: Any) -> int:
    """The seed of a diffusers-style `generator=` (a torch.Generator, or a list of them: the first one's)."""
    if isinstance(generator, (list, tuple)) and generator:
        generator = generator[0]
    if not isinstance(generator, torch.Generator):
        raise NanoDiffusionError(f"generator must be a torch.Generator, not {type(generator).__name__}: or pass "
                                 "seed=N")
    return generator.initial_seed()


def diffusers_step_callback(fn: Callable[..., Any]) -> Callable[[int, float, torch.Tensor, torch.Tensor], None]:
    """diffusers' callback_on_step_end(pipe, step, timestep, {"latents": x}) as our step callback. It may look at
    the latents; handing back different ones is refused (the sampler's state cannot be swapped mid-step here)."""

    def call(step: int, sigma: float, x: torch.Tensor, denoised: torch.Tensor) -> None:
        latents = x
        answer = fn(None, step, sigma, {"latents": latents})
        if isinstance(answer, dict) and answer.get("latents", latents) is not latents:
            raise NanoDiffusionError("callback_on_step_end returned new latents: nanodiffusion's samplers cannot "
                                     "take them mid-loop; use step_callback to watch, or img2img to restart")

    return call


class GenerationResult(list):
    """The generated images: a list, with diffusers' `.images` and `.nsfw_content_detected` (no checker: None)."""

    nsfw_content_detected = None

    @property
    def images(self) -> list[Image.Image]:
        return list(self)
