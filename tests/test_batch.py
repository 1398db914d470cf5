"""Batch generation (batch.py): the prompts file, 2 accelerate processes = 1 process byte for byte, resume after a
kill, one failing job reported while the others finish."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanodiffusion.batch import BatchJob, generate_jobs, read_jobs
from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.train.builtin import write_pipeline_folder
from serving import free_port
from tiny import tiny_pipeline

SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "timestep_spacing": "leading", "steps_offset": 1}
PROMPTS = "\n".join([
    "a red circle",
    "# a comment line, skipped",
    "a blue square above a red circle",
    "",
    '{"prompt": "a blue circle", "negative": "red", "seed": 7}',
    "a red square below a blue circle",
    '{"prompt": "a red blue square", "size": "48x32", "steps": 3}',
    '{"prompt": "a circle", "sampler": "DPM++ 2M", "cfg": 3, "name": "last.png"}',
])
NAMES = ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "last.png"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pipe = tiny_pipeline(32)
    pipe.vae.config.sample_size = 32   # the folder's default image size
    folder = tmp_path_factory.mktemp("model") / "tiny"
    return write_pipeline_folder(folder, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, SCHEDULER)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS + "\n", encoding="utf-8")
    return path


def nanodiff(*args: str, processes: int = 1) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", str(processes)]
    launch += ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else ["--cpu"]
    return [*launch, "-m", "nanodiffusion.cli", "generate", *args]


@pytest.fixture(scope="module")
def reference(model, prompts, tmp_path_factory) -> Path:
    """The batch made by one process."""
    out = tmp_path_factory.mktemp("one")
    result = subprocess.run(nanodiff("--prompts", str(prompts), "--outdir", str(out), "--model", str(model),
                                     "--steps", "6"), capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 jobs: 6 generated, 0 already done, 0 failed" in result.stdout
    return out


def test_prompts_file_settings_and_seeds(prompts):
    jobs = read_jobs(prompts, {"steps": 6, "negative_prompt": ""}, base_seed=100, loras=["a.safetensors:0.5"])
    assert [job.name for job in jobs] == NAMES
    assert [job.settings["seed"] for job in jobs] == [100, 101, 7, 103, 104, 105]
    assert jobs[2].settings["negative_prompt"] == "red" and jobs[0].settings["negative_prompt"] == ""
    assert (jobs[4].settings["width"], jobs[4].settings["height"], jobs[4].settings["steps"]) == (48, 32, 3)
    assert jobs[5].settings["sampler"] == "DPM++ 2M" and jobs[5].settings["cfg"] == 3
    assert jobs[0].loras == ((Path("a.safetensors"), 0.5),)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "steps": ', "line 2: not valid JSON"),
    ('{"text": "a red circle"}', "line 2: a JSON line needs a \"prompt\""),
    ('{"prompt": "a", "stepz": 3}', "line 2: unknown setting 'stepz'"),
    ('{"prompt": "a", "steps": "many"}', "line 2: steps 'many' has the wrong type"),
    ('{"prompt": "a", "size": "big"}', "line 2: size 'big' is not WIDTHxHEIGHT"),
    ('{"prompt": "a", "name": "00000.png"}', "two jobs write the same file 00000.png"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "p.txt"
    path.write_text(f"a red circle\n{line}\n")
    with pytest.raises(NanoDiffusionError, match=re.escape(message)):
        read_jobs(path, {})


def test_two_processes_make_the_same_bytes_as_one(model, prompts, reference, tmp_path):
    result = subprocess.run(nanodiff("--prompts", str(prompts), "--outdir", str(tmp_path), "--model", str(model),
                                     "--steps", "6", processes=2), capture_output=True, text=True, timeout=600,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 jobs: 6 generated, 0 already done, 0 failed" in result.stdout
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(NAMES)
    for name in NAMES:
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_killed_run_started_again_makes_only_the_missing_images(model, prompts, reference, tmp_path):
    command = nanodiff("--prompts", str(prompts), "--outdir", str(tmp_path), "--model", str(model), "--steps", "6")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("0*.png"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    assert 2 <= len(done) < 6, f"the run was not killed part-way: {sorted(done)}"

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"6 jobs: {6 - len(done)} generated, {len(done)} already done, 0 failed" in result.stdout
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in done} == done   # not written again
    for name in NAMES:
        assert (tmp_path / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_failing_job_is_reported_and_the_others_finish_and_settings_changes_rerun(tmp_path, capsys):
    pipe = tiny_pipeline(32)
    jobs = [BatchJob(0, "a red circle", "a.png", {"steps": 2, "seed": 1}),
            BatchJob(1, "a blue square", "b.png", {"steps": 2, "seed": 2, "sampler": "no such sampler"}),
            BatchJob(2, "a red square", "c.png", {"steps": 2, "seed": 3, "width": 30})]
    summary = generate_jobs(pipe, jobs, tmp_path, progress=False)
    assert summary.generated == 1 and len(summary.failed) == 2
    assert "unknown sampler 'no such sampler'" in summary.failed[0] and "width 30 is not allowed" in summary.failed[1]
    assert "error: job 1 (b.png" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("*.png")] == ["a.png"]

    again = generate_jobs(pipe, jobs[:1], tmp_path, progress=False)
    assert (again.generated, again.skipped) == (0, 1)
    changed = generate_jobs(pipe, [BatchJob(0, "a red circle", "a.png", {"steps": 3, "seed": 1})], tmp_path,
                            progress=False)
    assert (changed.generated, changed.skipped) == (1, 0)


def test_cli_batch_errors_are_one_line(tmp_path):
    from nanodiffusion.cli import main

    assert main(["generate", "--prompts", str(tmp_path / "missing.txt"), "--outdir", str(tmp_path)]) == 2
    assert main(["generate"]) == 2
    (tmp_path / "p.txt").write_text(json.dumps({"prompt": 3}) + "\n")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--outdir", str(tmp_path)]) == 2
