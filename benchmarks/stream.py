"""`nanodiff stream` speed and the cost of each StreamDiffusion idea -> docs/stream.md (rows in docs/stream-*.json).

A test video of a moving scene ("a red circle above a blue square", the circle and square drifting) is written
with PyAV and decoded back; its frames are pushed through the stream engine as fast as it goes. For each
configuration: FPS (frames / wall time), CPU FPS (frames / CPU seconds of this process: what one free core gives,
whatever else the machine runs), latency median and p95 (from a frame's arrival to the output that holds it),
and, on the built-in model, quality: the compositional evaluator's accuracy over the output frames and the PSNR
of each output to the slow path's output for the same frame. The load average is recorded with each run.

    python benchmarks/stream.py headline --json docs/stream-headline.json     # all ideas, 300 frames, 1-4 steps
    python benchmarks/stream.py quality --frames 60 --json docs/stream-quality.json
    python benchmarks/stream.py sd --frames 4 --sd-sizes 256 512 --json docs/stream-sd.json
    python benchmarks/stream.py table --json docs/stream-*.json               # the markdown table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from nanodiffusion.data.shapes import Obj, Scene, render
from nanodiffusion.evaluate import score
from nanodiffusion.stream import FrameWriter, StreamDiffusion, StreamSettings, load_tiny_vae, read_frames, run_stream

PROMPT = "a red circle above a blue square"
DOCS = Path(__file__).resolve().parents[1] / "docs"
SLOW = StreamSettings(prompt=PROMPT, stream_batch=False, guidance="full", cache_prompt=False, tiny_vae=False)
FAST = StreamSettings(prompt=PROMPT, similarity=0.995, tiny_vae=True)


def test_video(path: Path, frames: int, size: int) -> list:
    """Write a moving scene as an mp4 and decode it back (the frames the stream sees)."""
    writer = FrameWriter(path, fps=30)
    for i in range(frames):
        phase = 2 * math.pi * i / 150
        circle = Obj("circle", "red", 0.16, 0.5 + 0.25 * math.sin(phase), 0.27)
        square = Obj("square", "blue", 0.16, 0.5 - 0.25 * math.sin(phase + 0.7), 0.73)
        writer.write(render(Scene((circle, square), prompt=None), size))
    writer.close()
    return list(read_frames(path))


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def measure(pipe, frames: list, settings: StreamSettings, tiny) -> tuple[dict, list]:
    """Run the frames through a fresh engine; the summary (with the load average) and the output frames."""
    engine = StreamDiffusion(pipe, settings, tiny if settings.tiny_vae else None)
    engine(frames[0])   # warm-up: first-call allocations, prompt encoding
    engine = StreamDiffusion(pipe, settings, tiny if settings.tiny_vae else None)
    outputs: list = []
    load = os.getloadavg()[0]
    stats = run_stream(engine, frames, outputs.append)
    summary = {**stats.summary(), "load_before": load, "load_after": os.getloadavg()[0]}
    return summary, outputs


def quality(outputs: list, reference: list, lag: int, reference_lag: int) -> dict:
    """Evaluator accuracy of the outputs and mean PSNR to the reference outputs of the same frames."""
    correct = [score(image, PROMPT)["correct"] for image in outputs[lag:]]
    pairs = [(outputs[t + lag], reference[t + reference_lag])
             for t in range(len(outputs) - max(lag, reference_lag))]
    values = [psnr(a, b) for a, b in pairs]
    finite = [v for v in values if math.isfinite(v)]
    return {"evaluator": sum(correct) / len(correct),
            "psnr_db": sum(finite) / len(finite) if finite else float("inf")}


def builtin_setup(tiny_vae: str | None = None):
    """The built-in model, its tiny VAE (the shipped one if it fits, or `tiny_vae` unchecked: for speed only) and
    the all-ideas settings."""
    from nanodiffusion.models.tiny_vae import TinyAutoencoder
    from nanodiffusion.pipeline import Pipeline

    pipe = Pipeline.load()
    tiny = TinyAutoencoder.load(tiny_vae) if tiny_vae else load_tiny_vae(pipe, "auto")
    return pipe, tiny, dataclasses.replace(FAST, tiny_vae=tiny is not None)


def row(pipe, steps: int, name: str, summary: dict) -> dict:
    """One table row, printed as it is measured."""
    out = {"model": "built-in" if pipe.name == "builtin" else pipe.name, "size": pipe.default_size, "steps": steps,
           "config": name, **summary}
    print(json.dumps(out), flush=True)
    return out


def headline_rows(frames: list, steps_list: list[int], tiny_vae: str | None, filters: list[float]) -> list[dict]:
    """All ideas on, the whole test video, at each number of steps, with the similarity filter at each threshold
    (0: off): the speed target."""
    pipe, tiny, fast = builtin_setup(tiny_vae)
    rows = []
    for steps in steps_list:
        for similarity in filters:
            name = "all ideas" if similarity == fast.similarity else (
                "all ideas - similarity filter" if similarity == 0 else f"all ideas, similarity {similarity:g}")
            settings = dataclasses.replace(fast, steps=steps, similarity=similarity)
            rows.append(row(pipe, steps, name, measure(pipe, frames, settings, tiny)[0]))
    return rows


def quality_rows(frames: list, steps_list: list[int]) -> list[dict]:
    """The input frames, then the slow path and all ideas at each number of steps, then all ideas at 2 steps less
    one idea at a time; evaluator accuracy and PSNR to the slow path for each."""
    pipe, tiny, fast = builtin_setup()
    correct = [score(frame, PROMPT)["correct"] for frame in frames]
    rows = [{"model": "built-in", "size": pipe.default_size, "steps": 0, "config": "input frames (no diffusion)",
             "frames": len(frames), "evaluator": sum(correct) / len(correct)}]
    configs = []
    for steps in steps_list:
        configs.append((steps, "slow path", dataclasses.replace(SLOW, steps=steps)))
        configs.append((steps, "all ideas", dataclasses.replace(fast, steps=steps)))
    ablations = {"- stream batch": {"stream_batch": False}, "- residual CFG (full CFG)": {"guidance": "full"},
                 "- similarity filter": {"similarity": 0.0}, "- cached prompt": {"cache_prompt": False},
                 "- tiny VAE": {"tiny_vae": False}, "+ bf16": {"bf16": True}, "no guidance": {"guidance": "none"}}
    for name, change in ablations.items():
        if name != "- tiny VAE" or tiny is not None:
            configs.append((2, name, dataclasses.replace(fast, steps=2, **change)))
    slow_outputs = {}
    for steps, name, settings in configs:
        summary, outputs = measure(pipe, frames, settings, tiny)
        if name == "slow path":
            slow_outputs[steps] = outputs
        lag = steps - 1 if settings.stream_batch else 0
        rows.append(row(pipe, steps, name, {**summary, **quality(outputs, slow_outputs[steps], lag, 0)}))
    return rows


def sd_pipeline(size: int):
    """An SD 1.5-size pipeline with random weights (speed only): UNet, VAE and CLIP text encoder at full size."""
    from nanodiffusion.models.clip import CLIPTextConfig, CLIPTextModel
    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.models.vae import AutoencoderKL, VAEConfig
    from nanodiffusion.models.word_tokenizer import WordTokenizer
    from nanodiffusion.pipeline import Pipeline
    from nanodiffusion.schedules import NoiseSchedule

    torch.manual_seed(0)
    tokenizer = WordTokenizer.build([PROMPT], model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    unet = UNet2DConditionModel(UNetConfig(cross_attention_dim=768))
    vae = AutoencoderKL(VAEConfig.sd())
    for model in (text, unet, vae):
        model.eval().requires_grad_(False)
    return Pipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, schedule=NoiseSchedule(),
                    name="sd15-random", default_size=size)


def sd_rows(frames_per_run: int, sizes: list[int], video: Path, steps_list: list[int]) -> list[dict]:
    """The SD-size model: slow path vs stream batch + residual CFG (full VAE: no tiny one fits random weights)."""
    rows = []
    for size in sizes:
        pipe = sd_pipeline(size)
        frames = test_video(video.with_name(f"sd-{size}.mp4"), frames_per_run, size)
        for steps in steps_list:
            for name, settings in (("slow path", dataclasses.replace(SLOW, steps=steps, size=size)),
                                   ("all ideas", dataclasses.replace(FAST, steps=steps, size=size, tiny_vae=False,
                                                                     similarity=0.0))):
                summary, _ = measure(pipe, frames, settings, None)
                rows.append({"model": "SD 1.5 size (random)", "size": size, "steps": steps, "config": name,
                             **summary})
                print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def tiny_vae_rows(tiny_path: str, vae_path: str | None, n: int) -> list[dict]:
    """A tiny VAE against its teacher on n shapes scenes it was not trained on: PSNR of its decoding of the
    teacher's latents and of its own round trip to the teacher's round trip; CPU ms per 1-image encode + decode."""
    import time

    from nanodiffusion.images import to_pil
    from nanodiffusion.models.tiny_vae import TinyAutoencoder
    from nanodiffusion.train.data import collate, open_dataset
    from nanodiffusion.train.tiny_vae import load_teacher

    teacher, size = load_teacher(None, vae_path)
    tiny = TinyAutoencoder.load(tiny_path)
    images, _ = collate(open_dataset(None, size=size, length=n, seed=12345), torch.arange(n))
    scale = teacher.config.scaling_factor
    z = teacher.encode(images).mode() * scale
    reference = to_pil(teacher.decode(z / scale).clamp(-1, 1))
    decoded, round_trip = to_pil(tiny.decode(z)), to_pil(tiny.decode(tiny.encode(images)))

    def cpu_ms(encode, decode) -> float:
        start = time.process_time()
        for image in images.split(1):
            decode(encode(image))
        return (time.process_time() - start) / n * 1000

    rows = []
    for name, outputs in (("tiny decoder on the teacher's latents", decoded), ("tiny encoder + decoder", round_trip)):
        rows.append({"model": "tiny VAE vs its teacher", "size": size, "steps": 0, "config": name, "frames": n,
                     "psnr_db": sum(psnr(a, b) for a, b in zip(outputs, reference)) / n})
    rows[0]["cpu_ms_teacher"] = cpu_ms(lambda x: teacher.encode(x).mode(), teacher.decode)
    rows[0]["cpu_ms_tiny"] = cpu_ms(tiny.encode, tiny.decode)
    print(json.dumps(rows), flush=True)
    return rows


def cell(r: dict, key: str, spec: str) -> str:
    """A table cell, or — where the row has no such value."""
    return format(r[key], spec) if key in r and math.isfinite(r[key]) else "—"


def markdown(rows: list[dict]) -> str:
    """docs/stream.md's table."""
    lines = ["| model | px | steps | config | frames | FPS (wall) | CPU FPS | CPU FPS, median frame | CPU FPS, "
             "fastest 10% frame | latency median "
             "(ms) | p95 (ms) | skipped | load avg | evaluator | PSNR to slow path (dB) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(" | ".join([
            f"| {r['model']}", str(r["size"]), str(r["steps"]), r["config"], str(r["frames"]), cell(r, "fps", ".2f"),
            cell(r, "cpu_fps", ".1f"), cell(r, "cpu_fps_median_frame", ".1f"), cell(r, "cpu_fps_p10_frame", ".1f"),
            cell(r, "latency_ms_median", ".0f"),
            cell(r, "latency_ms_p95", ".0f"), cell(r, "skipped", "d"), cell(r, "load_before", ".1f"),
            cell(r, "evaluator", ".0%"), cell(r, "psnr_db", ".1f") + " |"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["headline", "quality", "sd", "tiny", "table"],
                        help="headline: all ideas over the whole video; quality: slow path and each idea; "
                             "sd: the SD-size model; tiny: --tiny-vae against its teacher (--vae, default the "
                             "built-in's); table: print the markdown table of the JSON files given")
    parser.add_argument("--vae", default=None, metavar="FOLDER", help="tiny: the teacher VAE folder")
    parser.add_argument("--frames", type=int, default=300, help="frames of the test video")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--tiny-vae", default=None, metavar="FOLDER",
                        help="headline: time this tiny VAE whatever VAE it was made for (speed only)")
    parser.add_argument("--similarity", type=float, nargs="+", default=[FAST.similarity, 0.0],
                        help="headline: similarity filter thresholds to run (0: off)")
    parser.add_argument("--sd-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--json", nargs="+", default=[str(DOCS / "stream.json")],
                        help="where the rows go (table: the files to read)")
    args = parser.parse_args()
    if args.part == "table":
        print(markdown([r for path in args.json for r in json.loads(Path(path).read_text())["rows"]]))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "tiny":
            rows = tiny_vae_rows(args.tiny_vae, args.vae, args.frames)
        elif args.part == "sd":
            rows = sd_rows(args.frames, args.sd_sizes, Path(tmp) / "sd.mp4", args.steps)
        else:
            frames = test_video(Path(tmp) / "builtin.mp4", args.frames, 64)
            rows = (headline_rows(frames, args.steps, args.tiny_vae, args.similarity) if args.part == "headline"
                    else quality_rows(frames, args.steps))
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "part": args.part}
    Path(args.json[0]).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
