"""Lesson `ddim-inversion`: DDIM (eta = 0) is the Euler method on the probability-flow ODE, so it is deterministic
and can be run backwards: image -> noise -> the same image (Song et al. 2021, sec. 4.3; Mokady et al. 2023);
and noises can be interpolated on the sphere (slerp)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..data.shapes import caption, render, sample_scene
from ..images import image_grid, to_pil, to_tensor
from ..samplers import sample_euler
from .builtin import load, text_denoiser
from .report import Page, pictures

STEP_COUNTS = (10, 25, 50)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation, keeping the norm a Gaussian noise has (Shoemake 1985)."""
    omega = torch.acos((a * b).sum() / (a.norm() * b.norm()))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    page.text("With eta = 0, DDIM's update is exactly one Euler step of the probability-flow ODE in the "
              "variance-exploding form. The same noise therefore always gives the same image, and running the "
              "steps with increasing sigma maps an image to the noise that generates it (inversion):")
    page.equation(r"x_{i+1} = x_i + (\sigma_{i+1}-\sigma_i)\,\frac{x_i - D(x_i,\sigma_i)}{\sigma_i}"
                  r"\quad(\sigma\downarrow:\ \text{generate},\ \sigma\uparrow:\ \text{invert}),\qquad"
                  r"\mathrm{slerp}(a,b;t) = \frac{\sin((1-t)\omega)a + \sin(t\omega)b}{\sin\omega}")
    page.code("samplers.py:sample_ddim", "samplers.py:sample_euler", "learn/ddim_inversion.py:slerp")
    pipe = load()
    scene = sample_scene(random.Random("inversion"), "train", "position")
    text = caption(scene.prompt, random.Random(0))
    image = to_tensor(render(scene, pipe.default_size))
    with torch.no_grad():
        z0 = pipe.vae.encode(image).mean * pipe.vae.config.scaling_factor
        denoiser = text_denoiser(pipe, [text], cfg=1.0)
        rows, strip = [], [to_pil(image)[0]]
        for steps in STEP_COUNTS:
            sigmas = pipe.schedule.sigmas(steps, "karras")[:-1]
            noise = sample_euler(denoiser, z0, sigmas.flip(0))
            back = sample_euler(denoiser, noise, sigmas)
            decoded = pipe.decode(back)
            mse = float((decoded - image).pow(2).mean())
            rows.append([steps, float((back - z0).pow(2).mean().sqrt()), 10 * math.log10(4 / mse),
                         float(noise.std() / sigmas[0])])
            strip += [pictures(noise[:, :3] / float(sigmas[0]))[0].resize(image.shape[-2:][::-1]),
                      to_pil(decoded)[0]]
        again = [sample_euler(denoiser, torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
                              * float(pipe.schedule.sigmas(20, "karras")[0]), pipe.schedule.sigmas(20, "karras"))
                 for _ in range(2)]
    page.image(image_grid(strip, columns=len(strip)), "inversion",
               f'"{text}": the image, then for {", ".join(map(str, STEP_COUNTS))} steps the inverted noise (first '
               "three latent channels, divided by sigma_max) and the image generated back from it")
    page.table(["steps", "latent RMSE after the round trip", "pixel PSNR (dB)", "std of inverted noise / sigma_max"],
               rows)
    page.text(f"Generating twice from the same noise (Euler = DDIM eta 0, 20 steps) differs by at most "
              f"{float((again[0] - again[1]).abs().max()):.1e}: the sampler is deterministic. Inversion is exact "
              "only in the limit of small steps, so the round trip improves with more steps.")
    a, b = (torch.randn(z0.shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    sigmas = pipe.schedule.sigmas(20, "karras")
    conditioned = text_denoiser(pipe, [text], cfg=pipe.default_cfg)
    frames = []
    with torch.no_grad():
        for mix in ("slerp", "lerp"):
            for t in torch.linspace(0, 1, 7).tolist():
                noise = slerp(a, b, t) if mix == "slerp" else (1 - t) * a + t * b
                frames.append(to_pil(pipe.decode(sample_euler(conditioned, noise * float(sigmas[0]), sigmas)))[0])
    page.image(image_grid(frames, columns=7), "interpolation",
               f'"{text}" from noise a (left) to noise b (right), guidance {pipe.default_cfg:g}. Top: slerp. Bottom: '
               "straight-line interpolation")
    half = (a + b) / 2
    page.text(f"Halfway, the straight-line mix has norm {float(half.norm() / a.norm()):.2f} times a Gaussian noise's "
              f"(slerp: {float(slerp(a, b, 0.5).norm() / a.norm()):.2f}): it is off the shell where the model's "
              "starting noise lives, which matters more the larger the latent.")
    return page.write()
