"""The DiT: adaLN-Zero starts every block (and the whole model) at the identity / zero; patches map back to
their own pixels; timestep and label condition the output; bad configs fail clearly."""

from __future__ import annotations

import pytest
import torch

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.dit import DiT, DiTBlock, DiTConfig

CONFIG = DiTConfig(sample_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=3)


def randomise(model: torch.nn.Module) -> None:
    """Give the zero-initialised layers random weights, as training would."""
    torch.manual_seed(1)
    for p in model.parameters():
        if not p.abs().sum():
            p.data.normal_(0, 0.2)


def test_adaln_zero_starts_as_identity_and_zero_output():
    torch.manual_seed(0)
    block = DiTBlock(32, 4, 4.0)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(block(h, c), h)
    model = DiT(CONFIG)
    assert torch.equal(model(torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 2])),
                       torch.zeros(2, 3, 8, 8))


def test_trained_dit_depends_on_timestep_and_label_and_keeps_patches_in_place():
    model = DiT(CONFIG)
    randomise(model)
    x = torch.randn(1, 3, 8, 8)
    out = model(x, 100.0, torch.tensor([0]))
    assert out.shape == x.shape
    assert (out - model(x, 900.0, torch.tensor([0]))).abs().max() > 1e-3
    assert (out - model(x, 100.0, torch.tensor([1]))).abs().max() > 1e-3
    assert model(x, 100.0).shape == x.shape                      # no label: the "null" class of CFG
    shallow = DiT(DiTConfig(sample_size=8, hidden_size=32, depth=0, num_heads=4))
    randomise(shallow)
    bumped = x.clone()
    bumped[0, :, 2:4, 4:6] += 1.0                                 # one patch (row 1, column 2)
    with torch.no_grad():
        change = (shallow(bumped, 5.0) - shallow(x, 5.0)).abs().sum(1)[0]
    assert change[2:4, 4:6].min() > 0 and float(change.sum()) == pytest.approx(float(change[2:4, 4:6].sum()))


def test_dit_config_errors():
    with pytest.raises(NanoDiffusionError, match="patch_size"):
        DiT(DiTConfig(sample_size=9, patch_size=2))
