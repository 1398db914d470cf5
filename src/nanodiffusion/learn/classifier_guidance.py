"""Lesson `classifier-guidance`: a noise-conditional classifier trained on the built-in model's latents steers its
unconditional model towards a colour (Dhariwal & Nichol 2021, Alg. 1), swept over the guidance scale."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.shapes import COLORS
from ..evaluate import detect
from ..guidance import classifier_guidance
from ..images import image_grid, to_pil
from ..models.classifier import NoisyClassifier
from ..samplers import sample_euler
from ..train.fit import fit
from ..train.score import log_uniform_sigmas
from .builtin import load, text_denoiser
from .report import Page, pyplot
from .toys import shapes_images

SCALES, PER_COLOR, STEPS = (0.0, 1.0, 3.0, 10.0), 4, 20


def run(out: Path, lesson) -> Path:
    page = Page(lesson.name, lesson.title, out)
    plt = pyplot()
    page.text("Classifier guidance adds the gradient of a classifier's log-probability to the model's score. The "
              "classifier must work on noisy inputs, so it is trained on latents noised to every level. With "
              "x = x0 + sigma eps the score is (D - x) / sigma^2, so the guided denoiser is:")
    page.equation(r"\tilde D(x,\sigma) = D(x,\sigma) + w\,\sigma^2\,\nabla_x \log p_\phi(y\mid x,\sigma)")
    page.code("guidance.py:classifier_guidance", "models/classifier.py:NoisyClassifier")
    pipe = load()
    images, colors = shapes_images(512, pipe.default_size, seed=21)
    labels = torch.tensor([COLORS.index(c) for c in colors])
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(images[i:i + 64]).mean for i in range(0, len(images), 64)])
        latents = latents * pipe.vae.config.scaling_factor
    torch.manual_seed(0)
    classifier = NoisyClassifier(latents.shape[1], len(COLORS))
    low, high = pipe.schedule.sigma_min, pipe.schedule.sigma_max
    g = torch.Generator().manual_seed(1)

    def loss(step: int) -> torch.Tensor:
        i = torch.randint(0, 448, (64,), generator=g)
        sigma = log_uniform_sigmas(64, low, high, g).float()
        x = latents[i] + sigma[:, None, None, None] * torch.randn(latents[i].shape, generator=g)
        return F.cross_entropy(classifier(x, sigma), labels[i])

    losses = fit(classifier, loss, 600, lr=2e-3, desc="noisy classifier")
    accuracy_rows = []
    with torch.no_grad():
        for sigma in (0.1, 1.0, 3.0, 10.0):
            x = latents[448:] + sigma * torch.randn(latents[448:].shape, generator=g)
            hits = (classifier(x, torch.full((64,), sigma)).argmax(1) == labels[448:]).float().mean()
            accuracy_rows.append([sigma, float(hits)])
    page.table(["sigma", "classifier accuracy on held-out noised latents (6 colours)"], accuracy_rows)
    targets = torch.arange(len(COLORS)).repeat_interleave(PER_COLOR)
    unconditional = text_denoiser(pipe, [""] * len(targets), cfg=1.0)
    sigmas = pipe.schedule.sigmas(STEPS, "karras")
    side = pipe.default_size // pipe.vae_scale
    noise = torch.randn((len(targets), latents.shape[1], side, side), generator=torch.Generator().manual_seed(2))
    rows, shown = [], []
    for scale in SCALES:
        guided = classifier_guidance(unconditional, classifier, targets, scale)
        with torch.no_grad():
            drawn = to_pil(pipe.decode(sample_euler(guided, noise * float(sigmas[0]), sigmas)))
        present = [COLORS[int(t)] in {d.color for d in detect(image)} for image, t in zip(drawn, targets)]
        rows.append([scale, sum(present) / len(present)])
        shown += drawn[::PER_COLOR]
    page.image(image_grid(shown, columns=len(COLORS)), "sweep",
               f"Rows: guidance scale {', '.join(f'{s:g}' for s in SCALES)}; columns: target colour "
               f"{', '.join(COLORS)}; the unconditional model (empty prompt), same noise per column")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([s for s, _ in rows], [a for _, a in rows], "o-")
    ax1.set(xlabel="guidance scale w", ylabel="target colour present", ylim=(0, 1.05),
            title=f"evaluator, {len(targets)} images per scale")
    ax2.plot(losses, lw=0.5)
    ax2.set(yscale="log", xlabel="step", title="classifier training loss")
    page.figure(fig, "accuracy", "Share of images in which the evaluator finds an object of the target colour")
    page.table(["guidance scale", "target colour present (evaluator)"], rows)
    return page.write()
