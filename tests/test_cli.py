"""`nanodiff` end to end: bad input is one `error: ...` line and exit 2 (never a traceback), found before any
model loads; a good command writes its PNG and nothing else."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nanodiffusion import cli
from nanodiffusion.loading import BUILTIN


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model or starting the server."""
    from nanodiffusion.pipeline import Pipeline
    from nanodiffusion.server import app

    def refuse(*args, **kwargs):
        raise AssertionError("the bad input was not caught before loading the model / starting the server")

    monkeypatch.setattr(Pipeline, "load", refuse)
    monkeypatch.setattr(app, "serve", refuse)


def exit_code(argv: list[str]) -> int:
    """cli.main's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("flags, words", [
    (["--cfg", "nan"], "--cfg[-/a-z]*: nan is not allowed"), (["--cfg", "inf"], "--cfg[-/a-z]*: inf is not allowed"),
    (["--cfg=-inf"], "--cfg[-/a-z]*: -inf is not allowed"), (["--eta", "nan"], "--eta: nan is not allowed"),
    (["--strength", "nan"], "--strength: nan is not allowed"),
    (["--seed", str(2**64)], "--seed: 18446744073709551616 is not allowed"),
    (["--seed", "-5"], "--seed: -5 is not allowed"),
    (["--lora", "ink.safetensors:nan"], "LoRA weight nan"), (["--lora", "ink.safetensors:inf"], "LoRA weight inf"),
    (["--lora", "ink.safetensors:1e308"], "LoRA weight 1e\\+308"),
    (["-o", ""], "-o is empty"),
    (["--sampler", "DPM fast"], "unknown sampler 'DPM fast'"), (["--schedule", "beta"], "scheduler 'beta' is not"),
    (["--sampler", "DPM++ 2M Align Your Steps"], "'Align Your Steps' is not implemented"),
])
def test_bad_generate_flags_are_one_error_line_before_the_model_loads(no_model, capsys, flags, words):
    assert exit_code(["generate", "a red circle", *flags]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    assert re.search(words, err), err


def test_an_output_that_cannot_be_written_is_refused_before_generating(no_model, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    (tmp_path / "batch-01.png").mkdir()
    cases = [(["-o", str(tmp_path)], "is a folder"), (["-o", str(blocker / "out.png")], "cannot write -o"),
             (["-o", str(tmp_path / "batch.png"), "--batch", "2"], "batch-01.png is a folder")]
    for flags, words in cases:
        assert exit_code(["generate", "a red circle", *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and err.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-01.png", "file.txt"]  # no .NAME.tmp, no probe


@pytest.mark.parametrize("argv, words", [
    (["serve", "--port", "99999"], "--port: 99999 is not allowed"), (["serve", "--port", "0"], "not allowed"),
    (["train", "diffusion", "--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["train", "vae", "--checkpoint-every", "0"], "--checkpoint-every 0 is not allowed"),
    (["train", "diffusion", "--log-every", "0"], "--log-every 0 is not allowed"),
    (["train", "diffusion", "--grad-accum", "0"], "--grad-accum 0 is not allowed"),
    (["train", "diffusion", "--lr", "nan"], "--lr nan is not allowed"),
    (["finetune", "lora", "--data", "x", "--lr", "nan"], "--lr nan is not allowed"),
])
def test_bad_serve_and_training_flags_exit_2(no_model, tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # no run folder started


def test_serve_checks_its_outputs_folder_and_port_before_the_banner(no_model, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert exit_code(["serve", "--outputs", str(blocker / "outputs")]) == 2
    assert "cannot write --outputs" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert exit_code(["serve", "--outputs", str(tmp_path / "out"), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in captured.err and "nanodiffusion:" not in captured.out


@pytest.mark.parametrize("part, change", [
    ("model_index.json", [1, 2]), ("model_index.json", {"_nanodiffusion": "builtin"}),
    ("model_index.json", {"_nanodiffusion": {"default_size": "big"}}),
    ("unet/config.json", {"block_out_channels": "abc"}), ("unet/config.json", {"layers_per_block": "1"}),
    ("vae/config.json", []), ("text_encoder/config.json", {"hidden_size": 32.5}),
    ("scheduler/scheduler_config.json", {"beta_start": "x"}),
])
def test_a_model_folder_with_wrong_types_is_one_error_line(tmp_path, capsys, part, change):
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN, folder)
    original = json.loads((folder / part).read_text())
    (folder / part).write_text(json.dumps({**original, **change} if isinstance(change, dict) else change))
    assert exit_code(["generate", "a red circle", "--model", str(folder), "--steps", "1",
                      "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out.png").exists()


def test_nanodiff_generate_end_to_end(tmp_path):
    """The installed command: a PNG with its parameters, exit 0; then a bad flag: exit 2, one line, no traceback."""
    command = [str(Path(sys.executable).with_name("nanodiff")), "generate", "a red circle above a blue square",
               "--steps", "2", "--seed", "3", "-o", str(tmp_path / "out.png")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "out.png")
    from PIL import Image

    with Image.open(tmp_path / "out.png") as image:
        assert "Seed: 3" in image.info["parameters"] and image.getextrema() != ((0, 0),) * 3  # not a black image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    webui = subprocess.run([*command[:3], "-s", "2", "--sampler", "k_dpmpp_2m", "--scheduler", "Karras", "-W", "64",
                            "-H", "64", "-o", str(tmp_path / "webui.png")], capture_output=True, text=True, timeout=300,
                           env=env)
    assert webui.returncode == 0, webui.stderr[-2000:]
    with Image.open(tmp_path / "webui.png") as image:
        assert "Sampler: DPM++ 2M, Schedule type: Karras" in image.info["parameters"]
    (tmp_path / "webui.png").unlink()
    bad = subprocess.run([*command, "--cfg", "nan"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "error: argument --cfg" in bad.stderr
    assert Path(tmp_path / "out.png").stat().st_size > 0


def test_generate_with_styles_and_an_xyz_plot(tmp_path):
    """--style NAME from --styles-file (the web UI's styles.csv) and --xyz axes: one labelled grid PNG."""
    from PIL import Image

    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nbold,"{prompt}, bright colours",blurry\n')
    out = tmp_path / "plot.png"
    assert cli.main(["generate", "a red circle", "--xyz", "cfg=1,3", "--xyz", "steps=1-2", "--style", "bold",
                     "--styles-file", str(styles), "--seed", "1", "-o", str(out)]) in (0, None)
    with Image.open(out) as grid:
        text = grid.info["parameters"]
        assert grid.width > 2 * 64 and grid.height > 2 * 64
    assert text.startswith("a red circle, bright colours\nNegative prompt: blurry")
    assert 'X Type: CFG scale, X Values: "1, 3", Y Type: Steps, Y Values: "1, 2"' in text
