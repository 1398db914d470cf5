"""The Stable Diffusion pipeline: prompt -> text encoder -> sampler loop over the UNet -> VAE -> images.

txt2img starts from seeded noise at the first sigma; img2img starts from the encoded image noised to
the sigma that `strength` selects; inpainting either feeds a 9-channel inpainting UNet the mask and the
masked image, or (ordinary checkpoints) pins the known region: the denoiser returns the encoded image
there, so every ODE step carries the known region along its exact noising path (x = z0 + sigma * noise).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import sd3, sdxl
from .controlnet_files import prepare_control_image
from .denoisers import Denoiser
from .errors import NanoDiffusionError
from .fast import FastOptions, fast_paths
from .fast.preview import LatentPreview
from .flow_schedule import step_from_noise
from .guidance import LayoutGuidance, as_schedule, cfg_denoiser, guidance_scale_embedding
from .images import mask_to_tensor, to_pil, to_tensor
from .inpaint_region import masked_box, paste_masked
from .lora_files import TAG_OPEN, check_lora_weight, load_lora, resolve_lora_tags
from .models.controlnet import controlnet_unet
from .models.layout import layout_noise
from .models.mmdit import SD3Transformer2DModel
from .noise import seeded_noise
from .prompt_schedule import batch_conditioning
from .prompts import encode_prompts, format_parameters, prompt_warnings
from .request import GenerationRequest, GenerationResult, check_size
from .sampler_names import scheduler_label
from .samplers import SamplerInfo, get_sampler
from .schedules import NoiseSchedule
from .tiling import circular_padding

HIRES_UPSCALER_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}
SMALL_WORK = 1e10  # latent cells x UNet parameters below which one thread is faster (the built-in model: 2e9)
EXACT_PREVIEW_CELLS = 32 * 32  # latents this small are previewed with the real VAE decode


class Interrupted(Exception):
    """Raised by a progress callback to stop a generation cleanly."""


@dataclass
class Pipeline:
    """A loaded text-to-image model: UNet, VAE, text encoder, tokenizer and noise schedule."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: NoiseSchedule
    prediction: str = "epsilon"
    name: str = "model"
    model_hash: str = ""
    default_size: int = 512
    default_cfg: float = 7.0
    default_layout_cfg: float | None = None   # a layout model's map guidance scale (LayoutGuidance); None: = cfg
    default_steps: int = 20
    default_sampler: str = "euler_a"
    clip_skip: int = 1
    loras: list[tuple[Path, float]] = field(default_factory=list)
    controlnet: torch.nn.Module | None = None
    layout: torch.nn.Module | None = None    # the built-in model's layout stage (models/layout.py), None for SD
    text_encoder_2: torch.nn.Module | None = None   # SDXL's OpenCLIP bigG / SD3's CLIP-G, with projection, else None
    tokenizer_2: object | None = None
    text_encoder_3: torch.nn.Module | None = None   # SD3's T5 encoder (sd3.py); None for SD3 without T5 and others
    tokenizer_3: object | None = None
    force_zeros_for_empty_prompt: bool = True       # SDXL: an empty negative prompt is zeros, not encoded
    aesthetic_score: float | None = None            # the SDXL refiner's positive score (§2.5); None for the others
    lora_dir: Path | None = None
    fast: FastOptions = field(default_factory=FastOptions)   # approximate fast paths (fast/), all off by default
    previewer: LatentPreview | None = field(default=None, repr=False)
    precision: str = "float32"   # the UNet / VAE compute precision (precision.py)

    @classmethod
    def load(cls, path: str | Path | None = None, *, tokenizer: str | Path | None = None,
             prediction: str | None = None, weights_dtype: str | torch.dtype | None = None,
             precision: str | None = None, t5: bool | None = None) -> "Pipeline":
        """Load the built-in model (path None), a diffusers folder, or an original single file; weights_dtype
        "bfloat16" / "float16" stores the conv / linear weights in half precision (compute stays float32);
        precision "bfloat16" / "float32" is the compute precision (None: this CPU's default, precision.py); t5 (SD3):
        None uses T5 when the model has it, False runs without it, True requires it."""
        from .loading import load_pipeline

        return load_pipeline(cls, path, tokenizer=tokenizer, prediction=prediction, weights_dtype=weights_dtype,
                             precision=precision, t5=t5)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_inpainting_model(self) -> bool:
        """True for 9-channel inpainting UNets (latents + mask + masked-image latents)."""
        return self.unet.config.in_channels == 9

    def check_size(self, width: int, height: int) -> None:
        """Sizes must be positive multiples of 8 (and of the VAE factor) and not absurdly large."""
        check_size(width, height, max(8, self.vae_scale))

    @property
    def is_sdxl(self) -> bool:
        """SDXL (Podell et al. 2023): two text encoders and the UNet's added conditioning (sdxl.py)."""
        return self.text_encoder_2 is not None and not self.is_sd3

    @property
    def is_refiner(self) -> bool:
        """The SDXL refiner (§2.5): OpenCLIP bigG alone, aesthetic-score time ids; it refines, it does not start."""
        return self.is_sdxl and self.text_encoder is None

    @property
    def is_sd3(self) -> bool:
        """SD3 / SD3.5 (Esser et al. 2024): a rectified-flow MMDiT over three text encoders' states (sd3.py)."""
        return isinstance(self.unet, SD3Transformer2DModel)

    def encode_conditioning(self, texts: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """Each text's network inputs besides x and t, one row per text, all encoded together (one chunk count):
        SD: {"context"}; SDXL: both encoders' penultimate states and bigG's pooled "text_embeds", zeros for an
        empty text when the model says force_zeros_for_empty_prompt (diffusers' default negative prompt); SD3: the
        joint "context" of CLIP-L, CLIP-G and T5 (zeros without it) and the pooled "pooled_projections"."""
        if self.is_sd3:
            context, pooled = sd3.encode_text(
                self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.tokenizer(texts),
                self.tokenizer_2(texts), None if self.tokenizer_3 is None else self.tokenizer_3(texts),
                self.unet.config.joint_attention_dim, state=-(clip_skip + 1))
            return {"context": context, "pooled_projections": pooled}
        if not self.is_sdxl:
            return {"context": encode_prompts(self.text_encoder, self.tokenizer, texts, clip_skip=clip_skip)}
        context, pooled = sdxl.encode_prompts(None if self.is_refiner else self.text_encoder, self.text_encoder_2,
                                              self.tokenizer, self.tokenizer_2, texts, state=-(clip_skip + 1))
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([text != "" for text in texts], dtype=context.dtype)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        return {"context": context, "text_embeds": pooled}

    def encode_text(self, prompts: list[str], negatives: list[str],
                    clip_skip: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encode prompts and negative prompts together (the same number of chunks): (cond rows, uncond rows)."""
        both = self.encode_conditioning(prompts + negatives, clip_skip)
        return ({key: value[: len(prompts)] for key, value in both.items()},
                {key: value[len(prompts):] for key, value in both.items()})

    @contextmanager
    def lora_applied(self, loras: list[tuple[Path, float]]):
        """Apply LoRAs at run time (unmerged, each with its weight) for the duration of a generation."""
        models = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        for path, weight in loras:
            check_lora_weight(weight, path.name)
        networks = [load_lora(path, models).apply_unmerged(weight) for path, weight in loras]
        try:
            yield
        finally:
            for network in reversed(networks):
                network.remove()

    def prompt_loras(self, prompt: str) -> tuple[str, list[tuple[Path, float]]]:
        """Strip `<lora:NAME:W>` tags from a prompt and resolve them in the LoRA folder."""
        return resolve_lora_tags(prompt, self.lora_dir)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents, one posterior sample per image with its own generator."""
        latents = [self.vae.encode(image[i:i + 1]).sample(generator=g) for i, g in enumerate(generators)]
        return self.vae.scale_latents(torch.cat(latents))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        return self.vae.decode(self.vae.unscale_latents(latents)).clamp(-1, 1)

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Preview images of scaled latents (e.g. the x0 estimate of a step): the VAE itself for small latents
        (<= 32x32, a few ms), else a cheap linear latent -> RGB map (fast/preview.py; fitted to this VAE on first
        use), since an SD-size VAE decode costs seconds per step."""
        if latents.shape[-2] * latents.shape[-1] <= EXACT_PREVIEW_CELLS:
            return to_pil(self.decode(latents))
        if self.previewer is None:
            self.previewer = LatentPreview.fit(self.vae, self.vae_scale)
        return to_pil(self.previewer(latents))

    def __call__(self, prompt: str | list[str] | GenerationRequest | None = None,
                 negative_prompt: str | list[str] | None = None, **settings: Any) -> GenerationResult:
        """Generate images for a GenerationRequest, or for its settings as keywords (ours or diffusers' names:
        num_inference_steps, guidance_scale, generator, ...). Returns the images (a list with `.images`), `batch`
        per iteration with seeds seed, seed + 1, ...; each carries its PNG parameters text."""
        if isinstance(prompt, GenerationRequest):
            if negative_prompt is not None or settings:
                raise NanoDiffusionError("pass a GenerationRequest alone, or settings as keywords, not both")
            return self.run(prompt)
        return self.run(GenerationRequest.from_kwargs(prompt, negative_prompt, **settings))

    def run(self, request: GenerationRequest) -> GenerationResult:
        """Check the request, apply its LoRAs (the pipeline's, the request's and the prompts' <lora:...> tags),
        fast paths and tiling, and generate its n_iter iterations."""
        r = request.resolved(self)
        if r.mask_only:
            return self.inpaint_masked_area(r)
        texts, tagged = self.strip_lora_tags(r.prompt)
        for text in dict.fromkeys(texts):
            for message in prompt_warnings(self.tokenizer, text):
                warnings.warn(message, PromptWarning, stacklevel=3)
        cells = r.width * r.height // self.vae_scale**2
        work = cells * sum(p.numel() for p in self.unet.parameters())
        images = GenerationResult()
        with self.lora_applied([*self.loras, *r.loras, *tagged]), thread_budget(work), fast_paths(self.unet, r.fast), \
                circular_padding([self.unet, self.vae, r.controlnet] if r.tiling else []):
            for iteration in range(r.n_iter):
                images += self.generate(r, texts, [r.seed + iteration * r.batch + i for i in range(r.batch)])
        return images

    def inpaint_masked_area(self, r: GenerationRequest) -> GenerationResult:
        """Inpaint only the box around the mask at the full width x height, then paste it back into the init
        image (scaled to width x height) through the mask (inpaint_region.py)."""
        base = r.init_image.convert("RGB").resize((r.width, r.height), Image.LANCZOS)
        mask = r.mask.convert("L").resize((r.width, r.height))
        box = masked_box(mask, r.mask_padding, r.width, r.height)
        crop = replace(r, init_image=base.crop(box), mask=mask.crop(box), mask_only=False)
        return GenerationResult(paste_masked(base, image, mask, box) for image in self.run(crop))

    def strip_lora_tags(self, prompts: list[str]) -> tuple[list[str], list[tuple[Path, float]]]:
        """The prompts without their <lora:NAME:W> tags, and the tags' LoRAs (the same in every prompt of a batch:
        one batch runs one set of weights)."""
        stripped = [self.prompt_loras(text) for text in prompts]
        if any(loras != stripped[0][1] for _, loras in stripped):
            raise NanoDiffusionError("the prompts of one batch name different <lora:...> tags: generate them "
                                     "separately, or give every prompt the same tags")
        return [text for text, _ in stripped], stripped[0][1]

    def generate(self, r: GenerationRequest, texts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One iteration of a resolved request (LoRAs applied, tags removed): sample (handing the last part of the
        schedule to the refiner, if any), hires-fix, decode, label."""
        if r.refiner is None:
            latents = self.sample(r, texts, seeds, r.width, r.height, r.steps)
        else:
            switch = self.refiner_step(r)
            latents = self.sample(r, texts, seeds, r.width, r.height, r.steps, stop=switch)
            latents = r.refiner.sample(replace(r, init_image=None, mask=None, controlnet=None, control_image=None),
                                       texts, seeds, r.width, r.height, r.steps, known=latents, start=switch,
                                       renoise=False)
        width, height = r.width, r.height
        if r.hires is not None:
            width, height = r.hires.target(r.width, r.height)
            known = self.upscale(latents, r.hires.upscaler, width, height, seeds)
            run = r.hires.steps or r.steps   # the second pass runs exactly this many steps (as the web UI's does)
            total = int(run / min(r.hires.strength, 0.999))
            latents = self.sample(r, texts, seeds, width, height, total, known=known, start=total - run)
        images = to_pil((r.refiner or self).decode(latents))   # the refiner's VAE when it finished the latents
        info = get_sampler(r.sampler)
        for i, out in enumerate(images):
            out.info["parameters"] = self.parameters_text(r, i, seeds[i], info.display_name, width, height)
        return images

    def sample(self, r: GenerationRequest, texts: list[str], seeds: list[int], width: int, height: int, steps: int,
               known: torch.Tensor | None = None, start: int = 0, stop: int | None = None,
               renoise: bool = True) -> torch.Tensor:
        """The sampling loop: scaled latents of one image per seed. txt2img from seeded noise; img2img from the
        request's init image noised to the sigma that its strength selects, or from `known` latents (the hires
        fix's second pass) noised to the sigma of step `start` (renoise False: `known` is already at that sigma, the
        base model's latents a refiner continues); inpainting as the module docstring says. With `stop`, only the
        steps before it run and the latents come back as they are at that sigma (for a refiner)."""
        batch = len(seeds)
        info = get_sampler(r.sampler)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        options = {"eta": r.eta} if r.eta is not None and "eta" in inspect.signature(info.fn).parameters else {}
        noise_schedule = info.schedule(self.schedule)   # keys the config lacks: this sampler's diffusers defaults
        sigmas = info.sigmas(noise_schedule, steps, r.schedule)
        if stop is not None:
            sigmas = sigmas[:stop + 1]
        shape = (1, self.vae.config.latent_channels, height // self.vae_scale, width // self.vae_scale)
        net = self.unet_function(r.control_image, r.control_scale, width, height, r.controlnet)
        cond, uncond = batch_conditioning(
            lambda prompts: self.encode_conditioning(prompts, r.clip_skip),
            lambda c, u, rows: self.guidance_inputs(c, u, generators, *shape[-2:], rows, r.cfg), texts,
            r.negative_prompt,
            steps)
        if (self.layout is not None and r.layout_cfg is not None and r.layout_cfg != r.cfg and r.cfg != 0
                and not self.guidance_embedded):
            cond = LayoutGuidance(as_schedule(cond), as_schedule(uncond), (r.layout_cfg - r.cfg) / r.cfg)
        mask = r.mask if known is None else None
        img2img = known is not None or r.init_image is not None
        if known is None and r.init_image is not None:
            start = self.img2img_start(steps, r.strength)
            image = to_tensor(r.init_image, (width, height)).expand(batch, -1, -1, -1)
            if start > 0 or mask is None or not self.is_inpainting_model:
                known = self.encode_image(image, generators)
        if img2img:
            sigmas = info.truncate(sigmas, start)
            if len(sigmas) < 2:
                raise NanoDiffusionError(f"strength {r.strength} with {steps} steps leaves nothing to do: "
                                         "raise the strength or the steps")
        resize = None if r.seed_resize_from is None else (
            *shape[:2], r.seed_resize_from[1] // self.vae_scale, r.seed_resize_from[0] // self.vae_scale)
        noise = torch.cat([seeded_noise(shape, g, r.subseed + i, r.subseed_strength, resize)
                           for i, g in enumerate(generators)])
        if known is None or (mask is not None and start == 0) or math.isinf(sigmas[0]):
            x = noise * info.initial_noise_scale(sigmas, noise_schedule)
        elif not renoise:
            x = known
        else:
            x = known + noise * sigmas[0]

        denoiser = Denoiser(net, noise_schedule, self.prediction, info.multistep)
        if mask is not None:
            pixel_mask = mask_to_tensor(mask, (width, height))
            latent_mask = torch.nn.functional.interpolate(pixel_mask, size=shape[-2:])
            if self.is_inpainting_model:
                masked = self.encode_image(image * (pixel_mask < 0.5), generators)
                net = self.inpainting_function(latent_mask.expand(batch, -1, -1, -1), masked)
                denoiser = Denoiser(net, noise_schedule, self.prediction, info.multistep)
            else:
                denoiser = pin_known_region(denoiser, latent_mask, known)
        guided = info.clipped(
            cfg_denoiser(denoiser, cond, uncond, 1.0 if self.guidance_embedded else r.cfg,
                         r.fast.guidance_min_sigma(sigmas), sigmas), noise_schedule)

        bar = tqdm(total=len(sigmas) - 1, desc="sampling", disable=not r.progress, leave=False)

        def on_step(i: int, sigma: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
            bar.update(1)
            if not torch.isfinite(x).all():
                raise NanoDiffusionError(f"sampling diverged at step {i + 1} of {len(sigmas) - 1} (NaN or inf in the "
                                         f"latents); likely cause: {self.divergence_cause(r.cfg, r.prompt[0])}")
            if r.step_callback is not None:   # (step, sigma, x entering the step, its guided x0 estimate)
                r.step_callback(i, float(sigma), entering[0], denoised)
            entering[0] = x
            if r.callback is not None:
                r.callback(i + 1, len(sigmas) - 1, denoised)

        entering = [x]
        with torch.no_grad():
            x = run_sampler(info, guided, x, sigmas, generators, on_step, options)
        bar.close()
        final_sigma = float(sigmas[-1])
        return x / math.sqrt(1 + final_sigma**2) if final_sigma > 0 and stop is None else x

    def img2img_start(self, steps: int, strength: float) -> int:
        """The step an init image at `strength` starts from, as diffusers' pipelines count it: SD / SDXL run
        int(steps x strength) steps, SD3 skips int(steps - steps x strength) (one step more where the product is
        not whole)."""
        if self.is_sd3:
            return int(max(steps - steps * strength, 0))
        return steps - min(int(steps * strength), steps)

    def refiner_step(self, r: GenerationRequest) -> int:
        """The step at which the refiner takes over (Podell et al. 2023 §2.5; diffusers' denoising_end /
        denoising_start): the base runs the steps whose timestep is at least (1 - refiner_switch_at) x the training
        timesteps, the refiner the rest."""
        info = get_sampler(r.sampler)
        noise_schedule = info.schedule(self.schedule)
        sigmas = info.sigmas(noise_schedule, r.steps, r.schedule)[:-1]
        total = noise_schedule.num_train_timesteps
        cutoff = int(round(total - r.refiner_switch_at * total))
        switch = sum(1 for sigma in sigmas if round(float(noise_schedule.sigma_to_t(sigma))) >= cutoff)
        first = self.img2img_start(r.steps, r.strength) if r.init_image is not None else 0
        if not first < switch < len(sigmas):
            raise NanoDiffusionError(f"refiner_switch_at {r.refiner_switch_at} leaves no steps to the "
                                     f"{'refiner' if switch >= len(sigmas) else 'base model'} with {r.steps} steps: "
                                     "use a value such as 0.8, or more steps")
        return switch

    @torch.no_grad()
    def upscale(self, latents: torch.Tensor, upscaler: str, width: int, height: int,
                seeds: list[int]) -> torch.Tensor:
        """The hires fix's upscale: latents resized (bilinear / nearest), or decoded, Lanczos-resized and encoded
        again (one posterior sample per seed)."""
        size = (height // self.vae_scale, width // self.vae_scale)
        if upscaler.startswith("latent"):
            mode = "nearest" if upscaler == "latent-nearest" else "bilinear"
            return torch.nn.functional.interpolate(latents, size=size, mode=mode)
        pixels = torch.cat([to_tensor(image.resize((width, height), Image.LANCZOS))
                            for image in to_pil(self.decode(latents))])
        return self.encode_image(pixels, [torch.Generator().manual_seed(seed) for seed in seeds])

    def divergence_cause(self, cfg: float, shown_prompt: str) -> str:
        """The most likely reason sampling produced NaN / inf, for the error message."""
        if any(not torch.isfinite(p).all() for p in self.unet.parameters()):
            return "the model's weights hold NaN or inf values: the checkpoint is corrupt"
        if cfg > 15:
            return f"cfg {cfg:g} is too high: try 5 to 9"
        if self.loras or TAG_OPEN in shown_prompt:
            return "a LoRA weight too large or a LoRA for another model: lower its weight"
        return "an emphasis weight too large, or half-precision weights that overflow: try --weights-dtype float32"

    def parameters_text(self, r: GenerationRequest, i: int, seed: int, sampler: str, width: int,
                        height: int) -> str:
        """Image i's generation parameters in the popular web UI's PNG "parameters" layout."""
        hires, variation = r.hires, r.subseed_strength > 0
        return format_parameters(r.prompt[i], r.negative_prompt[i], {
            "Steps": r.steps, "Sampler": sampler,
            "Schedule type": scheduler_label(r.schedule),
            "CFG scale": f"{r.cfg:g}", "Layout CFG scale": None if r.layout_cfg is None else f"{r.layout_cfg:g}",
            "Seed": seed, "Size": f"{r.width}x{r.height}",
            "Model hash": self.model_hash or None, "Model": self.name,
            "Denoising strength": r.strength if r.init_image is not None else hires and hires.strength,
            "Clip skip": r.clip_skip if r.clip_skip > 1 else None,
            "Variation seed": r.subseed + seed - r.seed if variation else None,
            "Variation seed strength": r.subseed_strength if variation else None,
            "Seed resize from": "{}x{}".format(*r.seed_resize_from) if r.seed_resize_from else None,
            "Hires upscale": f"{hires.scale:g}" if hires and not (hires.width or hires.height) else None,
            "Hires resize": f"{width}x{height}" if hires and (hires.width or hires.height) else None,
            "Hires steps": hires.steps or None if hires else None,
            "Hires upscaler": HIRES_UPSCALER_NAMES[hires.upscaler] if hires else None,
            "Tiling": True if r.tiling else None,
            "Refiner": f"{r.refiner.name} [{r.refiner.model_hash}]".replace(" []", "") if r.refiner else None,
            "Refiner switch at": r.refiner_switch_at if r.refiner else None,
            "Version": "nanodiffusion",
        })

    def unet_function(self, control_image: Image.Image | None, control_scale: float, width: int,
                      height: int, controlnet: torch.nn.Module | None = None) -> Callable[..., torch.Tensor]:
        """The network as the denoiser calls it: net(x_in, t, context=..., [layout=...]) -> prediction
        (ControlNet-steered with `controlnet`, by default the pipeline's; reading the slot map when the model has a
        layout stage)."""
        controlnet = self.controlnet if controlnet is None else controlnet
        if controlnet is not None:
            image = prepare_control_image(control_image, width, height)
            net = controlnet_unet(self.unet, controlnet, image, control_scale)
        else:
            unet = self.unet

            def net(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **added: torch.Tensor) -> torch.Tensor:
                return unet(x, t, context, **added)

        return net if self.layout is None else with_layout_channels(net)

    @property
    def guidance_embedded(self) -> bool:
        """A guidance-distilled UNet (an LCM's w-conditioning): the cfg scale is an input, not two passes."""
        return bool(getattr(self.unet.config, "time_cond_proj_dim", None))

    def guidance_inputs(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                        generators: list[torch.Generator], height: int, width: int, rows: list[int] | None = None,
                        cfg: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The conditional and unconditional inputs of classifier-free guidance for encoded texts cond / uncond
        (encode_conditioning): with a layout stage, also its slot map on the height x width latent grid (one box
        draw per generator) and a blank map for the unconditional branch; for SDXL, the size "time ids" (§2.2).
        `rows`: the generator of each cond row (default: its own); for a guidance-distilled UNet, the embedding
        of the guidance scale `cfg` (default: the model's)."""
        cond, uncond = dict(cond), dict(uncond)
        if self.guidance_embedded:
            scale, dim = self.default_cfg if cfg is None else cfg, self.unet.config.time_cond_proj_dim
            cond["timestep_cond"] = guidance_scale_embedding(scale, dim, len(cond["context"]))
            uncond["timestep_cond"] = guidance_scale_embedding(scale, dim, len(uncond["context"]))
        if self.is_sdxl:
            micro = sdxl.MicroConditioning((height * self.vae_scale, width * self.vae_scale),
                                           (height * self.vae_scale, width * self.vae_scale),
                                           aesthetic_score=self.aesthetic_score)
            cond["time_ids"] = micro.time_ids(len(cond["context"]))
            uncond["time_ids"] = micro.negative().time_ids(len(uncond["context"]))
        if self.layout is not None:
            noise = layout_noise(generators, self.layout.config.slots)
            cond["layout"] = self.layout(cond["context"], noise if rows is None else noise[rows], height, width)
            uncond["layout"] = cond["layout"].new_zeros(len(uncond["context"]), *cond["layout"].shape[1:])
        return cond, uncond

    def inpainting_function(self, mask: torch.Tensor, masked: torch.Tensor) -> Callable[..., torch.Tensor]:
        """A 9-channel inpainting UNet sees [latents, mask, masked-image latents] (Rombach et al. 2022)."""
        unet = self.unet

        def net(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **added: torch.Tensor) -> torch.Tensor:
            repeat = x.shape[0] // mask.shape[0]
            extra = torch.cat([mask, masked], dim=1).repeat(repeat, 1, 1, 1)
            return unet(torch.cat([x, extra], dim=1), t, context, **added)

        return net


def run_sampler(info: SamplerInfo, denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                generators: list[torch.Generator], callback: Callable[..., None], options: dict) -> torch.Tensor:
    """The sampler over `sigmas`. A rectified-flow list starts at sigma = inf (pure noise, Esser et al. 2024): its
    first step is flow_schedule.step_from_noise, and the sampler walks the rest of the list."""
    if not math.isinf(sigmas[0]):
        return info.fn(denoiser, x, sigmas, generator=generators, callback=callback, **options)
    x, x0 = step_from_noise(denoiser, x, float(sigmas[1]))
    callback(0, sigmas[0], x, x0)
    return info.fn(denoiser, x, sigmas[1:], generator=generators, callback=lambda i, *step: callback(i + 1, *step),
                   **options)


def with_layout_channels(net: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A layout-conditioned UNet sees [latents, slot map] as its input channels (models/layout.py)."""

    def layered(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x, layout.repeat(x.shape[0] // layout.shape[0], 1, 1, 1)], dim=1), t, context)

    return layered


class PromptWarning(UserWarning):
    """The prompt runs, but not quite as written (empty, unknown words, split into chunks)."""


def pin_known_region(denoiser: Callable[..., torch.Tensor], mask: torch.Tensor,
                     known: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Inpainting with an ordinary model: D'(x, sigma) = m * D(x, sigma) + (1 - m) * z0."""

    def pinned(x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        repeat = x.shape[0] // known.shape[0]
        z0 = known.repeat(repeat, 1, 1, 1)
        return mask * denoiser(x, sigma, **cond) + (1 - mask) * z0

    return pinned


@contextmanager
def thread_budget(work: float):
    """Tiny models on tiny latents (work = latent cells x UNet parameters) run faster on one thread: splitting
    small kernels across cores costs more than it saves, and far more on a busy machine. SD-size work uses
    every thread. The user's OMP_NUM_THREADS, when set, is respected."""
    if work > SMALL_WORK or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
