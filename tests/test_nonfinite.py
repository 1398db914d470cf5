"""Bad numbers and text stop a generation with one clear error: non-finite settings, diverging sampling, prompts."""

import math

import pytest
import torch
from tiny import tiny_pipeline

from nanodiffusion.errors import NanoDiffusionError


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(32)


@pytest.mark.parametrize("kwargs, message", [
    ({"cfg": math.nan}, "cfg nan"), ({"cfg": math.inf}, "cfg inf"),
    ({"eta": math.nan, "sampler": "DPM++ SDE"}, "eta nan"), ({"eta": math.inf, "sampler": "Euler a"}, "eta inf"),
])
def test_non_finite_settings_are_refused(pipe, kwargs, message):
    with pytest.raises(NanoDiffusionError, match=message):
        pipe("a red circle", steps=2, seed=1, **kwargs)


@pytest.mark.parametrize("weight", [math.nan, math.inf, 1e308])
def test_non_finite_or_huge_lora_weights_are_refused(pipe, tmp_path, weight):
    pipe.loras = [(tmp_path / "style.safetensors", weight)]
    try:
        with pytest.raises(NanoDiffusionError, match="LoRA weight .* for 'style.safetensors' is not allowed"):
            pipe("a red circle", steps=2, seed=1)
    finally:
        pipe.loras = []


def test_nan_latents_stop_sampling_naming_the_cause(pipe):
    steps = []
    weight = next(p for p in pipe.unet.parameters() if p.dim() == 4)
    saved = weight.detach().clone()
    with torch.no_grad():   # in place on the parameter itself, so weight caches keyed by its version see it
        weight[0, 0, 0, 0] = math.nan
    try:
        with pytest.raises(NanoDiffusionError, match=r"diverged at step 1 of 4 .*checkpoint is corrupt"):
            pipe("a red circle", steps=4, seed=1, callback=lambda step, total, x0: steps.append(step))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert steps == []   # stopped at the first step, before the callback saw NaN
    assert len(pipe("a red circle", steps=2, seed=1)) == 1   # and the model still works once repaired


def test_prompt_text_problems_are_named(pipe):
    with pytest.raises(NanoDiffusionError, match="negative prompt is 20001 characters"):
        pipe("a red circle", "x" * 20_001, steps=2)
    with pytest.raises(NanoDiffusionError, match=r"prompt holds an unpaired surrogate \('\\udc80'\) at character 2"):
        pipe("a \udc80 circle", steps=2)
    with pytest.raises(NanoDiffusionError, match="emphasis weight '1.2.3' is not a number"):
        pipe("a (red:1.2.3) circle", steps=2)
    with pytest.raises(NanoDiffusionError, match="emphasis weight .* is out of range"):
        pipe("(" * 60 + "red" + ")" * 60, steps=2)


def test_divergence_cause_names_the_likeliest_setting(pipe):
    assert "cfg 20 is too high" in pipe.divergence_cause(20.0, "a circle")
    assert "LoRA weight" in pipe.divergence_cause(7.0, "a circle <lora:ink:3>")
    assert "emphasis weight" in pipe.divergence_cause(7.0, "a circle")
