"""Fuzzing the checkpoint readers (Hypothesis): random bytes, truncations and byte flips of a real tiny
safetensors file either load or raise NanoDiffusionError, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nanodiffusion.checkpoints import METADATA_KEY, load_state_dict, read_metadata, sniff_format
from nanodiffusion.errors import NanoDiffusionError


def real_file() -> bytes:
    """A small safetensors checkpoint with our configs in its header, as bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        tensors = {"model.diffusion_model.conv_in.weight": torch.arange(24.0).reshape(2, 3, 2, 2),
                   "first_stage_model.quant_conv.bias": torch.ones(3, dtype=torch.float16)}
        save_file(tensors, path, metadata={METADATA_KEY: json.dumps({"unet": {"sample_size": 8}})})
        return path.read_bytes()


REAL = real_file()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_all(data: bytes) -> None:
    """Every reader of a checkpoint header on `data`; only our error type may escape."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.safetensors"
        path.write_bytes(data)
        for reader in (sniff_format, read_metadata, load_state_dict):
            try:
                reader(path)
            except NanoDiffusionError as error:
                assert "\n" not in str(error)


def test_the_real_file_reads():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(REAL)
        assert read_metadata(path) == {"unet": {"sample_size": 8}}
        assert load_state_dict(path)["first_stage_model.quant_conv.bias"].dtype == torch.float32


@FUZZ
@given(st.integers(0, len(REAL) - 1))
def test_truncations(length):
    read_all(REAL[:length])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips(flips):
    data = bytearray(REAL)
    for index, value in flips:
        data[index] = value
    read_all(bytes(data))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    read_all(data)


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_random_header_lengths_and_headers(length, header):
    read_all(length.to_bytes(8, "little") + b"{" + header)


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8))
def test_json_headers_of_any_shape(value):
    header = json.dumps({"__metadata__": value, "w": value}).encode()
    read_all(len(header).to_bytes(8, "little") + header)
