"""bfloat16 compute: what runs in bfloat16 and what stays float32, its cost, and the default."""

import numpy as np
import pytest
import torch

from nanodiffusion import precision
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.pipeline import Pipeline
from nanodiffusion.precision import compute_in, default_precision, precision_dtype
from tiny import tiny_pipeline


def packed_dtype(layer: torch.nn.Module) -> torch.dtype:
    """The dtype a layer's oneDNN-packed weight was made for."""
    return layer.packed[0][2]


def test_bfloat16_unet_keeps_norms_time_embedding_and_output_in_float32():
    pipe = tiny_pipeline()
    unet = pipe.unet
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 5, unet.config.cross_attention_dim)
    t = torch.tensor([999.0, 3.0])
    full = unet(x, t, context)
    compute_in(unet, torch.bfloat16, keep=("time_embedding",), keep_args=(1,))
    half = unet(x, t, context)
    assert packed_dtype(unet.conv_in) == packed_dtype(unet.conv_out) == torch.bfloat16
    assert packed_dtype(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k) == torch.bfloat16
    assert packed_dtype(unet.time_embedding.linear_1) == torch.float32   # 999 is not a bfloat16 number
    assert unet.conv_in.weight.dtype == unet.conv_norm_out.weight.dtype == torch.float32   # stored as loaded
    assert half.dtype == torch.float32
    assert 0 < (half - full).abs().max() < 0.05 * full.abs().max()


def test_pipeline_in_bfloat16_is_close_to_float32():
    images = {}
    for name in ("float32", "bfloat16"):
        pipe = Pipeline.load(precision=name)
        assert pipe.precision == name
        dtype = precision_dtype(name, 0)
        assert pipe.unet.conv_in.packed is None   # small: packed on its first call, for the size it meets
        assert pipe.vae.encoder.conv_in.packed is None   # on its first use (img2img)
        assert pipe.text_encoder.text_model.final_layer_norm.weight.dtype == torch.float32
        images[name] = np.asarray(pipe("a red circle above a blue square", steps=6, seed=3)[0], dtype=np.float64)
        assert packed_dtype(pipe.unet.conv_in) == packed_dtype(pipe.vae.decoder.conv_in) == dtype
        assert packed_dtype(pipe.vae.post_quant_conv) == torch.float32
        text_layer = pipe.text_encoder.text_model.encoder.layers[0].mlp.fc1
        assert (text_layer.packed is None) == (name == "float32")   # float32 multiplies the plain weight
    mse = ((images["float32"] - images["bfloat16"]) ** 2).mean()
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 35   # measured 53 dB at 20 steps


def test_default_precision_and_bad_names(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: True)
    assert default_precision(860_000_000) == "bfloat16" and default_precision(5_000_000) == "float32"
    assert precision_dtype(None, 860_000_000) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: False)
    assert default_precision(860_000_000) == "float32"
    assert Pipeline.load().precision == "float32"   # the built-in model is small: float32 by default
    with pytest.raises(NanoDiffusionError, match="unknown precision 'half'; choose one of: float32, bfloat16"):
        Pipeline.load(precision="half")
