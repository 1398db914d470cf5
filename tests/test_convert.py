"""`nanodiff convert` never loses data: an output that is the input is refused before anything is written, and a
failed conversion leaves no partial output (and any previous output as it was)."""

from __future__ import annotations

import hashlib
import os

import pytest
from tiny import tiny_pipeline

from nanodiffusion import checkpoints
from nanodiffusion.checkpoints import Checkpoint, convert, default_scheduler, load_checkpoint, save_diffusers
from nanodiffusion.cli import main
from nanodiffusion.errors import NanoDiffusionError


def snapshot(root) -> dict[str, tuple[str, int]]:
    """Every file under root (or root itself) -> (sha256, mode)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode) for p in files}


@pytest.fixture
def folder(tmp_path):
    pipe = tiny_pipeline(32)
    models = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    ckpt = Checkpoint(parts={name: {k: v.half() for k, v in m.state_dict().items()} for name, m in models.items()},
                      configs={name: m.config.to_dict() for name, m in models.items()},
                      scheduler=default_scheduler("epsilon"), info={"version": "v1"}, tokenizer_dir=None)
    save_diffusers(ckpt, tmp_path / "model")  # fp16 weights: an in-place conversion would rewrite them as fp32
    return tmp_path / "model"


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(folder, tmp_path, capsys):
    convert(folder, tmp_path / "model.safetensors")
    single = tmp_path / "model.safetensors"
    os.link(single, tmp_path / "hardlink.safetensors")
    before = {**snapshot(folder), **snapshot(single)}
    for source, destination in [(folder, folder), (folder, f"{folder}/"), (folder, folder / ".." / "model"),
                                (single, single), (single, tmp_path / "hardlink.safetensors")]:
        with pytest.raises(NanoDiffusionError, match="is the input"):
            convert(source, destination)
    assert main(["convert", str(folder), str(folder)]) == 2
    assert "error: the output" in capsys.readouterr().err
    assert {**snapshot(folder), **snapshot(single)} == before


@pytest.mark.parametrize("target", ["out", "out.safetensors"])
def test_a_failed_conversion_leaves_no_partial_output_and_keeps_the_old_one(folder, tmp_path, monkeypatch, target):
    real_save = checkpoints.save_file
    fail_at = 1 if target.endswith(".safetensors") else 2  # a folder: after its first part is written
    calls = []

    def disk_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == fail_at:
            path.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    destination = tmp_path / target
    convert(folder, destination)
    before = snapshot(destination)
    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(folder, destination)
    assert snapshot(destination) == before  # the previous output is kept
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        convert(folder, tmp_path / f"fresh-{target}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", target])  # nothing partial, no .tmp-
    monkeypatch.undo()
    convert(folder, tmp_path / f"fresh-{target}")
    assert load_checkpoint(tmp_path / f"fresh-{target}").parts.keys() == load_checkpoint(folder).parts.keys()
