"""Speed and quality cost of the approximate fast paths (nanodiffusion.fast), and memory of half-precision weights.

Every fast path is off by default; this script measures what each one buys and costs:
  * quality on the built-in model: the compositional evaluator's overall score on `--prompts` held-out and
    training prompts (20 Euler a steps, seed 0, the same seeds for every configuration), the CPU seconds per
    image, and the mean |difference| to the exact path's images (0-1 pixel scale);
  * output difference on a random SD 1.5-shaped model (benchmarks/perf.py's weights) at 256 px, 8 Euler steps,
    CFG 7.5: CPU seconds per image and mean |difference| / PSNR against the exact path (random weights: this
    measures how far each path moves the computation, not how good the images look);
  * the preview decoder (fast/preview.py) against a VAE decode of the same latents: time and PSNR;
  * token merging on one 512 px SD UNet step (where attention is large), and the speed of one 256 px UNet
    step per weight storage;
  * peak RSS (VmHWM) and time of a 512 px SD 1.5 image (2 Euler steps, CFG) with float32 (packed or not),
    bfloat16 and float16 weight storage, next to diffusers (float32), each in its own process.
Writes docs/fast.json and the tables into docs/fast.md (between its result markers).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fast.py            # about 45 minutes on one busy thread
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fast.py --parts memory   # re-measure one part
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from perf import CFG, NEGATIVE, PROMPT, SEED, WEIGHTS, make_weights, timed, write_table

from nanodiffusion.evaluate import evaluate_folder
from nanodiffusion.evaluate_model import generate_prompt_images
from nanodiffusion.fast import FastOptions
from nanodiffusion.fast.tome import token_merging
from nanodiffusion.packing import PackedWeight
from nanodiffusion.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILTIN_RUN = Path("/work/runs/builtin-3200")
BEGIN, END = "<!-- fast.py results: begin -->", "<!-- fast.py results: end -->"
CONFIGS = {
    "exact": FastOptions(),
    "cfg cutoff 0.6": FastOptions(cfg_cutoff=0.6),
    "cfg cutoff 0.4": FastOptions(cfg_cutoff=0.4),
    "DeepCache 2": FastOptions(deepcache=2),
    "DeepCache 3": FastOptions(deepcache=3),
    "ToMe 0.5": FastOptions(tome=0.5),
    "--fast preset": FastOptions.preset(),
}
SD_SIZE, SD_STEPS = 256, 8
MEMORY_SIZE, MEMORY_STEPS = 512, 2


def pixels(image) -> np.ndarray:
    """A PIL image as float64 in [0, 1]."""
    return np.asarray(image, dtype=np.float64) / 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# ---------------------------------------------------------------- quality on the built-in model

def builtin_quality(model: Path, prompts: int, steps: int) -> tuple[list[dict], dict]:
    """Evaluator scores, CPU time per image and difference to the exact images, per configuration; and the
    preview decoder on the last x0 estimate of one exact image."""
    pipe = Pipeline.load(model)
    pipe("a red circle", steps=2, seed=0)   # warm-up
    rows, exact = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in CONFIGS.items():
            pipe.fast = options
            row = {"config": name}
            cpu, diffs = 0.0, []
            for split in ("heldout", "train"):
                folder = Path(tmp) / name.replace(" ", "_") / split
                folder.mkdir(parents=True)
                start = time.process_time()
                generate_prompt_images(pipe, folder, prompts, split, 0, steps, None, "euler_a")
                cpu += time.process_time() - start
                row[split] = evaluate_folder(folder)["overall"]
                images = [pixels(_open(path)) for path in sorted(folder.glob("*.png"))]
                exact.setdefault(split, images)
                diffs += [float(np.abs(a - b).mean()) for a, b in zip(images, exact[split])]
            row["cpu_per_image"] = cpu / (2 * prompts)
            row["mean_abs_diff"] = float(np.mean(diffs))
            rows.append(row)
            print(f"built-in {name}: {row}", flush=True)
    pipe.fast, last = FastOptions(), {}
    pipe("a red circle above a blue square", steps=20, seed=0, callback=lambda i, n, x0: last.update(x0=x0))
    return rows, preview_quality(pipe, last["x0"])


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


# ---------------------------------------------------------------- output difference at SD size

def sd_difference(weights: Path) -> tuple[list[dict], dict]:
    """CPU time and difference to the exact image per configuration on the random SD 1.5 model, plus the
    preview decoder against the VAE on the exact run's last x0 estimate."""
    pipe = Pipeline.load(weights, precision="float32")
    kw = dict(steps=SD_STEPS, sampler="euler", cfg=CFG, seed=SEED, width=SD_SIZE, height=SD_SIZE)
    pipe(PROMPT, NEGATIVE, **{**kw, "steps": 1})   # warm-up (packs the weights)
    rows, exact, last = [], None, {}
    for name, options in CONFIGS.items():
        pipe.fast = options
        start, start_wall = time.process_time(), time.perf_counter()
        image = pixels(pipe(PROMPT, NEGATIVE, callback=lambda i, n, x0: last.update(x0=x0), **kw)[0])
        row = {"config": name, "cpu_seconds": time.process_time() - start,
               "seconds": time.perf_counter() - start_wall}
        if exact is None:
            exact, latent = image, last["x0"]
        row.update(mean_abs_diff=float(np.abs(image - exact).mean()), psnr=psnr(image, exact))
        rows.append(row)
        print(f"SD {name}: {row}", flush=True)
    pipe.fast = FastOptions()
    return rows, preview_quality(pipe, latent)


def preview_quality(pipe: Pipeline, latent: torch.Tensor) -> dict:
    """Seconds of a VAE decode and of a preview of the same latents (fit excluded, timed apart), and PSNR."""
    start = time.process_time()
    pipe.preview(latent)
    fit = time.process_time() - start
    timings = {}
    for name, fn in (("vae", lambda: pipe.decode(latent)), ("preview", lambda: pipe.previewer(latent))):
        start = time.process_time()
        out = fn()
        timings[name] = (time.process_time() - start, out)
    return {"fit_cpu_seconds": fit, "vae_cpu_seconds": timings["vae"][0],
            "preview_cpu_seconds": timings["preview"][0],
            "psnr": psnr(as_image(timings["preview"][1]), as_image(timings["vae"][1]))}


def as_image(t: torch.Tensor) -> np.ndarray:
    """The first image of a [-1, 1] batch as [H, W, 3] in [0, 1]."""
    return (t[0].permute(1, 2, 0).double().numpy() + 1) / 2


def tome_unet_step(weights: Path, size: int = 512, ratios: tuple[float, ...] = (0.5, 0.75)) -> list[dict]:
    """Token merging where attention is big: one SD UNet step at `size` px (batch 2), exact and merged, CPU
    seconds (median of 2 after a warm-up) and the relative difference of the noise prediction."""
    unet = Pipeline.load(weights, precision="float32").unet
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=g))
    rows, exact = [], None
    for ratio in (0.0, *ratios):
        with token_merging(unet, ratio) if ratio else nullcontext(), torch.no_grad():
            result = timed(lambda: unet(*args), 2)
        out = result.pop("output")
        exact = out if exact is None else exact
        rows.append({"ratio": ratio, "cpu_seconds": result["cpu_seconds"], "seconds": result["seconds"],
                     "relative_diff": float((out - exact).norm() / exact.norm())})
        print(f"ToMe {ratio} UNet step {size} px: {rows[-1]}", flush=True)
    return rows


def storage_unet_step(weights: Path, size: int = SD_SIZE) -> list[dict]:
    """The speed cost of half-precision storage: one SD UNet step at `size` px (batch 2), CPU seconds (median of
    2 after a warm-up), per weight storage, and the relative difference to the float32 noise prediction."""
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=g))
    rows, exact = [], None
    for dtype, packed in (("float32", True), ("float32", False), ("bfloat16", True), ("float16", True)):
        PackedWeight.enabled = packed
        unet = Pipeline.load(weights, weights_dtype=dtype, precision="float32").unet
        with torch.no_grad():
            result = timed(lambda: unet(*args), 2)
        out = result.pop("output")
        exact = out if exact is None else exact
        rows.append({"dtype": dtype, "packed": packed, "cpu_seconds": result["cpu_seconds"],
                     "relative_diff": float((out - exact).norm() / exact.norm())})
        print(f"storage {dtype} packed={packed} UNet step {size} px: {rows[-1]}", flush=True)
    PackedWeight.enabled = True
    return rows


# ---------------------------------------------------------------- peak RSS (one process per measurement)

def memory_worker(spec: dict) -> dict:
    """Load the SD 1.5 model with one weight storage, make one 512 px image, report time and peak RSS."""
    start = time.perf_counter()
    if spec["side"] == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(spec["weights"], safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        load = time.perf_counter() - start

        def generate():
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=MEMORY_STEPS, guidance_scale=CFG,
                        height=MEMORY_SIZE, width=MEMORY_SIZE, generator=torch.Generator().manual_seed(SEED))
    else:
        PackedWeight.enabled = spec["packed"]
        pipe = Pipeline.load(spec["weights"], weights_dtype=spec["dtype"], precision="float32")
        load = time.perf_counter() - start

        def generate():
            return pipe(PROMPT, NEGATIVE, steps=MEMORY_STEPS, sampler="euler", cfg=CFG, seed=SEED,
                        width=MEMORY_SIZE, height=MEMORY_SIZE)
    start, start_cpu = time.perf_counter(), time.process_time()
    generate()
    return {"load_seconds": load, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - start_cpu, "peak_rss_gb": peak_rss_gb()}


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over fork + exec,
    so a worker would report at least the parent's RSS at the time it was started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory(weights: Path) -> list[dict]:
    """Each weight storage of ours (float32 also with weight packing off) and diffusers' float32, each in a
    fresh interpreter."""
    rows = []
    for side, dtype, packed in (("ours", "float32", True), ("ours", "float32", False), ("ours", "bfloat16", True),
                                ("ours", "float16", True), ("diffusers", "float32", False)):
        spec = {"side": side, "dtype": dtype, "packed": packed, "weights": str(weights)}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{side} {dtype} failed:\n{done.stderr[-3000:]}")
        rows.append({**spec, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(f"memory {side} {dtype} packed={packed}: {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------- report

def table(title: str, columns: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A titled markdown table: the first `left` columns left-aligned, the rest (numbers) right-aligned."""
    rule = "|" + "|".join(["---"] * left + ["---:"] * (len(columns) - left)) + "|"
    return [title, "", "| " + " | ".join(columns) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows), ""]


def float32_label(row: dict, packed: str) -> str:
    """The weights column: the dtype, and for float32 whether the oneDNN-packed copies were on."""
    return row["dtype"] + ((f", {packed}" if row["packed"] else ", packing off") if row["dtype"] == "float32" else "")


def markdown(report: dict) -> str:
    """The results as markdown tables."""
    lines = [f"{report['threads']} thread(s), torch {torch.__version__}; load average {report['load'][0]:.1f} "
             f"at the start, {report['load_end'][0]:.1f} at the end of the last run ({report['parts']}: "
             f"{report['minutes']:.0f} minutes).", ""]
    if report.get("builtin"):
        base = report["builtin"][0]["cpu_per_image"]
        lines += table(
            f"**Built-in model** ({report['prompts']} held-out + {report['prompts']} training prompts, "
            "20 Euler a steps, seed 0; evaluator overall score; CPU seconds per image):",
            ["configuration", "held-out score", "train score", "CPU s / image", "speed-up", "mean abs diff to exact"],
            [[r["config"], f"{r['heldout']:.1%}", f"{r['train']:.1%}", f"{r['cpu_per_image']:.3f}",
              f"{base / r['cpu_per_image']:.2f}x", f"{r['mean_abs_diff']:.4f}"] for r in report["builtin"]])
    if report.get("sd"):
        base = report["sd"][0]["cpu_seconds"]
        lines += table(
            f"**Random SD 1.5-shaped model**, {SD_SIZE} px, {SD_STEPS} Euler steps, CFG {CFG}, one image "
            "(text encoder and VAE decode included):",
            ["configuration", "CPU s / image", "speed-up (CPU)", "wall s", "mean abs diff to exact", "PSNR to exact"],
            [[r["config"], f"{r['cpu_seconds']:.1f}", f"{base / r['cpu_seconds']:.2f}x", f"{r['seconds']:.1f}",
              f"{r['mean_abs_diff']:.4f}", f"{r['psnr']:.1f} dB"] for r in report["sd"]])
    for name, label in (("builtin_preview", "built-in model, 64 px"), ("sd_preview", f"random SD 1.5, {SD_SIZE} px")):
        if report.get(name):
            p = report[name]
            lines += [f"**Preview decoder**, {label}, on the last x0 estimate of an exact run: VAE decode "
                      f"{1000 * p['vae_cpu_seconds']:.1f} CPU ms, preview {1000 * p['preview_cpu_seconds']:.2f} CPU ms "
                      f"(one-off fit {p['fit_cpu_seconds']:.2f} s); PSNR of the preview to the decode "
                      f"{p['psnr']:.1f} dB.", ""]
    if report.get("tome"):
        base = report["tome"][0]["cpu_seconds"]
        lines += table(
            "**Token merging where attention is large**: one SD 1.5 UNet step at 512 px (4096 top-level "
            "tokens), batch 2, median of 2:",
            ["ToMe ratio", "CPU s", "speed-up (CPU)", "relative difference of the noise prediction"],
            [[f"{r['ratio']:g}", f"{r['cpu_seconds']:.2f}", f"{base / r['cpu_seconds']:.2f}x",
              f"{r['relative_diff']:.3f}"] for r in report["tome"]], left=0)
    if report.get("storage"):
        base = report["storage"][0]["cpu_seconds"]
        lines += table(
            f"**Weight storage, speed**: one SD 1.5 UNet step at {SD_SIZE} px, batch 2, median of 2:",
            ["weights", "CPU s", "time vs float32 packed", "relative difference of the noise prediction"],
            [[float32_label(r, "packed"), f"{r['cpu_seconds']:.2f}", f"{r['cpu_seconds'] / base:.2f}x",
              f"{r['relative_diff']:.1e}"] for r in report["storage"]])
    if report.get("memory"):
        lines += table(
            f"**Weight storage**, SD 1.5 random weights, one {MEMORY_SIZE} px image, {MEMORY_STEPS} Euler "
            "steps with CFG, each row its own process:",
            ["side", "weights", "peak RSS", "load s", "image wall s", "image CPU s"],
            [[r["side"], float32_label(r, "packed copies") if r["side"] == "ours" else r["dtype"],
              f"{r['peak_rss_gb']:.2f} GB", f"{r['load_seconds']:.1f}", f"{r['seconds']:.1f}",
              f"{r['cpu_seconds']:.1f}"] for r in report["memory"]], left=2)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=BUILTIN_RUN if BUILTIN_RUN.is_dir() else None,
                        help="the built-in model to score (default: a frozen copy when present, else the shipped one)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out and training prompts each")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="where perf.py's random SD 1.5 model is kept")
    parser.add_argument("--parts", default="builtin,sd,tome,storage,memory",
                        help="which measurements to run; the others are kept from an earlier OUTPUT.json")
    parser.add_argument("--output", type=Path, default=DOCS / "fast")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return
    started, load = time.time(), os.getloadavg()
    weights = make_weights(args.weights)
    json_path = args.output.with_suffix(".json")
    report = json.loads(json_path.read_text()) if json_path.is_file() else {}
    report.pop("partial", None)
    report.update(threads=torch.get_num_threads(), load=load, prompts=report.get("prompts", args.prompts),
                  parts=args.parts)
    parts = {"builtin": lambda: builtin_quality(args.model, args.prompts, 20), "sd": lambda: sd_difference(weights),
             "tome": lambda: tome_unet_step(weights), "storage": lambda: storage_unet_step(weights),
             "memory": lambda: memory(weights)}
    for name, run in parts.items():
        if name not in args.parts.split(","):
            continue
        if name == "builtin":
            report["prompts"] = args.prompts
        report[name] = run()
        if name in ("builtin", "sd"):
            report[name], report[f"{name}_preview"] = report[name]
        json_path.write_text(json.dumps({**report, "partial": True}, indent=2) + "\n")   # kept if a later part fails
    report.update(minutes=(time.time() - started) / 60, load_end=os.getloadavg())
    table = markdown(report)
    print(table)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    write_table(args.output.with_suffix(".md"), table, BEGIN, END)


if __name__ == "__main__":
    main()
