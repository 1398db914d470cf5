"""CPU speed and memory of nanodiffusion side by side with diffusers, in one run, on the same random weights.

One random Stable Diffusion 1.5-shaped model (UNet, VAE, CLIP text encoder, made by diffusers / transformers
and saved as a diffusers folder) is loaded by both sides; every measurement runs in its own subprocess so
its peak RSS is that side's alone. Measured (fp32, all cores torch uses):
  * UNet step (batch 2: the conditional and unconditional halves of classifier-free guidance), VAE decode
    (batch 1) and the text encoder (batch 2, 77 tokens): median of `repeats` timed runs after one warm-up;
    the warm-up's time is reported too (it includes one-off work such as weight packing);
  * txt2img end to end (Euler, 20 steps, CFG 7.5, one image), warm-up with a 1-step image of the same size;
  * achieved GFLOP/s of the UNet / VAE against the machine's fp32 matmul peak, measured in the same run
    (a large torch.mm); FLOPs counted with torch.utils.flop_counter on the meta device;
  * training steps/s of the built-in model's UNet config (fwd + bwd + AdamW) against diffusers'
    UNet2DConditionModel of the same config and weights in the same loop;
  * max |ours - diffusers| of every output (parity, same inputs).
Writes docs/performance.json and the tables into docs/performance.md (between its result markers).
`--whole` instead runs whole processes as a CLI user does (import + load + one DDIM image with CFG + save, one
process per image: `nanodiff generate` against a diffusers script) at float32 and bfloat16, 4 and 20 steps,
256 and 512 px (`--sizes`, `--steps`), `--repeats` processes per side and row (alternating sides; medians of
the wall / CPU seconds, the highest peak RSS), the PSNR of each
side's bfloat16 image to its own float32 image, and max |ours - diffusers| of the float32 images.

    python benchmarks/perf.py            # full: 256 and 512 px (about 25 minutes on 2 cores)
    python benchmarks/perf.py --quick    # 256 px only, fewer repeats (about 6 minutes)
    python benchmarks/perf.py --whole    # whole-process rows (--sizes 256 --steps 4 for the shortest)
    python benchmarks/perf.py --whole --family sdxl --sizes 1024 --steps 2 --repeats 1 --precisions float32
                                         # the same for an SDXL base-sized model (peak memory at 1024 px)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TOKENIZER = ROOT.parent / "shared" / "clip-tokenizer"
WEIGHTS = Path(tempfile.gettempdir()) / "nanodiffusion-perf-sd15"
SDXL_WEIGHTS = Path(tempfile.gettempdir()) / "nanodiffusion-perf-sdxl"
PROMPT, NEGATIVE, SEED, CFG, STEPS = "a photograph of an astronaut riding a horse", "blurry", 1, 7.5, 20
BEGIN, END = "<!-- perf.py results: begin -->", "<!-- perf.py results: end -->"
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    num_train_timesteps=1000)
# runwayml/stable-diffusion-v1-5's published scheduler config (no timestep_spacing: each scheduler's default)
SD15_SCHEDULER_CONFIG = ('{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, '
                         '"beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, '
                         '"set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, '
                         '"trained_betas": null, "clip_sample": false}')
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
BIG_G_TEXT = dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                  hidden_act="gelu", projection_dim=1280)   # OpenCLIP ViT-bigG, SDXL's second text encoder


# ---------------------------------------------------------------- the shared random model

def make_weights(folder: Path, family: str = "sd15") -> Path:
    """A random SD 1.5-shaped (or SDXL base-shaped) diffusers pipeline folder (kept between runs: it takes a minute
    or two to make)."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import transformers
    if family == "sdxl":
        return make_sdxl_weights(folder)

    from nanodiffusion.models.unet import UNetConfig
    from nanodiffusion.models.vae import VAEConfig

    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel.from_config(UNetConfig.sd15().to_dict()),
        vae=diffusers.AutoencoderKL.from_config(VAEConfig.sd().to_dict()),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(SD15_SCHEDULER_CONFIG)
    return folder


def make_sdxl_weights(folder: Path) -> Path:
    """A random SDXL base-shaped diffusers pipeline folder: UNet 2.6 B, CLIP-L, OpenCLIP bigG with its projection,
    the SDXL VAE (about 14 GB of float32 safetensors)."""
    import diffusers
    import transformers

    from nanodiffusion import sdxl
    from nanodiffusion.models.unet import UNetConfig

    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77)
    diffusers.StableDiffusionXLPipeline(
        unet=diffusers.UNet2DConditionModel.from_config(UNetConfig.sdxl().to_dict()),
        vae=diffusers.AutoencoderKL.from_config(sdxl.vae_config()),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)),
        text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**BIG_G_TEXT)),
        tokenizer=tokenizer, tokenizer_2=transformers.CLIPTokenizer.from_pretrained(
            str(TOKENIZER), model_max_length=77, pad_token="!"),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(sdxl.scheduler_config())).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- one measurement (runs in a subprocess)

def timed(fn, repeats: int) -> dict:
    """Warm-up call, then the medians of `repeats` calls: wall-clock seconds, and CPU seconds of this process
    (all its threads; less disturbed than wall time when other jobs share the cores)."""
    start = time.perf_counter()
    out = fn()
    warmup = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu), "runs": wall,
            "warmup": warmup, "output": out}


def load_part(side: str, part: str, folder: Path) -> torch.nn.Module:
    """One network of the saved pipeline, as ours or as the reference library's class."""
    from safetensors.torch import load_file

    if side == "diffusers":
        import diffusers
        import transformers
        cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
               "text_encoder": transformers.CLIPTextModel}[part]
        return cls.from_pretrained(folder / part).eval().requires_grad_(False)
    from nanodiffusion.checkpoint_keys import text_model_names
    from nanodiffusion.models.clip import CLIPTextConfig, CLIPTextModel
    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.models.vae import AutoencoderKL, VAEConfig
    config_cls, model_cls, name = {"unet": (UNetConfig, UNet2DConditionModel, "diffusion_pytorch_model"),
                                   "vae": (VAEConfig, AutoencoderKL, "diffusion_pytorch_model"),
                                   "text_encoder": (CLIPTextConfig, CLIPTextModel, "model")}[part]
    model = model_cls(config_cls.from_dict(json.loads((folder / part / "config.json").read_text())))
    state = load_file(folder / part / f"{name}.safetensors")
    model.load_state_dict(text_model_names(state) if part == "text_encoder" else state)
    return model.eval().requires_grad_(False)


def unwrap(out) -> torch.Tensor:
    """diffusers / transformers return output objects; ours return tensors."""
    for name in ("sample", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


def measure_network(side: str, task: str, size: int, repeats: int, folder: Path) -> dict:
    """Time one network call on fixed random inputs (the same on both sides)."""
    g = torch.Generator().manual_seed(0)
    if task == "unet":
        net = load_part(side, "unet", folder)
        args = (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
                torch.randn(2, 77, 768, generator=g))
        call = net
    elif task == "vae":
        net = load_part(side, "vae", folder)
        args, call = (torch.randn(1, 4, size // 8, size // 8, generator=g),), net.decode
    else:
        net = load_part(side, "text_encoder", folder)
        args, call = (torch.randint(0, 49408, (2, 77), generator=g),), net
    with torch.inference_mode():
        result = timed(lambda: unwrap(call(*args)).contiguous(), repeats)
    return result


def measure_txt2img(side: str, size: int, folder: Path) -> dict:
    """Prompt to pixels: 20 Euler steps with CFG; a 1-step image of the same size first as the warm-up."""
    import numpy as np

    if side == "diffusers":
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)

        def generate(steps: int):
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG,
                        height=size, width=size, generator=[torch.Generator().manual_seed(SEED)],
                        output_type="np").images[0]
    else:
        from nanodiffusion.pipeline import Pipeline
        pipe = Pipeline.load(folder, precision="float32")

        def generate(steps: int):
            image = pipe(PROMPT, NEGATIVE, steps=steps, sampler="euler", cfg=CFG, seed=SEED, width=size,
                         height=size)[0]
            return np.asarray(image, dtype=np.float64) / 255
    warmup_start = time.perf_counter()
    generate(1)
    warmup = time.perf_counter() - warmup_start
    start, start_cpu = time.perf_counter(), time.process_time()
    image = generate(STEPS)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu, "runs": [],
            "warmup": warmup, "output": torch.from_numpy(np.round(np.asarray(image) * 255))}


def measure_training(side: str, steps: int) -> dict:
    """fwd + bwd + AdamW steps/s of the built-in model's UNet config at its training batch and latent size."""
    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.train.builtin import BUILTIN_TEXT_ENCODER, BUILTIN_UNET, DIFFUSION_RECIPE, MAX_TOKENS

    torch.manual_seed(0)
    ours = UNet2DConditionModel(UNetConfig.from_dict(BUILTIN_UNET))
    unet = ours
    if side == "diffusers":
        import diffusers
        unet = diffusers.UNet2DConditionModel.from_config(BUILTIN_UNET)
        unet.load_state_dict(ours.state_dict())
    unet.train()
    batch, size = DIFFUSION_RECIPE["batch_size"], BUILTIN_UNET["sample_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, MAX_TOKENS, BUILTIN_TEXT_ENCODER["hidden_size"], generator=g)
    target = torch.randn(batch, 4, size, size, generator=g)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step():
        loss = torch.nn.functional.mse_loss(unwrap(unet(x, t, context)), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    result = timed(step, steps)
    result["batch"] = batch
    return result


def worker(spec: dict) -> None:
    """Run one measurement, save its output tensor for the parity check, print the result as JSON."""
    task, side, folder = spec["task"], spec["side"], Path(spec["weights"])
    if task == "txt2img":
        result = measure_txt2img(side, spec["size"], folder)
    elif task == "train":
        result = measure_training(side, spec["repeats"])
    else:
        result = measure_network(side, task, spec["size"], spec["repeats"], folder)
    torch.save(result.pop("output"), spec["output"])
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def run_worker(spec: dict, script: str = __file__) -> dict:
    """One measurement in a fresh interpreter running `script --worker SPEC` (so the peak RSS is its own)."""
    done = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"{spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- whole processes, as a CLI user runs them

WHOLE_BEGIN, WHOLE_END = "<!-- perf.py whole-process results: begin -->", "<!-- perf.py whole-process results: end -->"
SDXL_BEGIN = "<!-- perf.py SDXL whole-process results: begin -->"
SDXL_END = "<!-- perf.py SDXL whole-process results: end -->"
# diffusers' side of a whole-process row: import, load, one DDIM image with CFG, save (argv: folder steps size
# dtype output)
DIFFUSERS_SCRIPT = """
import sys, torch, diffusers
folder, steps, size, dtype, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe(%r, negative_prompt=%r, num_inference_steps=steps, guidance_scale=%r, height=size, width=size,
     generator=torch.Generator().manual_seed(%r)).images[0].save(out)
""" % (PROMPT, NEGATIVE, CFG, SEED)


def whole_process(side: str, folder: Path, steps: int, size: int, precision: str, out: Path) -> dict:
    """One image in a fresh process (import + load + generate + save): wall and CPU seconds, peak RSS."""
    if side == "ours":
        command = [sys.executable, "-m", "nanodiffusion.cli", "generate", PROMPT, "--negative", NEGATIVE,
                   "--model", str(folder), "--sampler", "ddim", "--steps", str(steps), "--cfg", str(CFG),
                   "--seed", str(SEED), "--width", str(size), "--height", str(size), "--precision", precision,
                   "-o", str(out)]
    else:
        command = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), str(steps), str(size), precision, str(out)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{side} {precision} {size} px failed:\n{child.stderr.read().decode()[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2**20}


def psnr(a: Path, b: Path) -> float:
    """Peak signal-to-noise ratio (dB) of two 8-bit images."""
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p), dtype=np.float64) for p in (a, b))
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def median_run(runs: list[dict]) -> dict:
    """One side's row from its repeated processes: median wall and CPU seconds, the highest peak RSS, every wall time."""
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "runs": [round(r["seconds"], 2) for r in runs]}


def run_whole(folder: Path, sizes: list[int], step_counts: list[int], repeats: int = 1,
              precisions: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict]:
    """Whole-process rows, both sides at each precision, one process at a time (`repeats` each, the sides
    alternating; medians); PSNR of each bf16 image to the same side's fp32 image, and max |ours - diffusers| of the
    fp32 images (parity)."""
    import numpy as np
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for steps in step_counts:
                images = {}
                for precision in precisions:
                    row = {"size": size, "steps": steps, "precision": precision}
                    runs = {"ours": [], "diffusers": []}
                    for _ in range(repeats):
                        for side in runs:
                            images[side, precision] = Path(tmp) / f"{side}-{precision}.png"
                            runs[side].append(whole_process(side, folder, steps, size, precision,
                                                            images[side, precision]))
                    row.update({side: median_run(side_runs) for side, side_runs in runs.items()})
                    row["ratio"] = row["ours"]["seconds"] / row["diffusers"]["seconds"]
                    rows.append(row)
                    print(f"{size} px, {steps} steps, {precision}: ours {row['ours']}, diffusers "
                          f"{row['diffusers']}", flush=True)
                if "bfloat16" in precisions and "float32" in precisions:
                    for side in ("ours", "diffusers"):
                        rows[-1][side]["psnr_to_fp32"] = psnr(images[side, "float32"], images[side, "bfloat16"])
                if "float32" in precisions:
                    fp32 = [np.asarray(Image.open(images[side, "float32"]), dtype=np.float64) for side in
                            ("ours", "diffusers")]
                    rows[-len(precisions)]["max_abs_diff"] = float(np.abs(fp32[0] - fp32[1]).max())
    return rows


def whole_markdown(rows: list[dict]) -> str:
    """The whole-process rows as a markdown table."""
    lines = ["| size, DDIM steps | precision | ours | diffusers | ours / diffusers (wall) | (CPU time) | "
             "ours peak RSS | diffusers peak RSS | bf16 PSNR to fp32: ours / diffusers | fp32 max abs diff | "
             "processes per side |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        o, d = row["ours"], row["diffusers"]
        quality = f"{o['psnr_to_fp32']:.1f} / {d['psnr_to_fp32']:.1f} dB" if "psnr_to_fp32" in o else ""
        parity = f"{row['max_abs_diff']:.0f}/255" if "max_abs_diff" in row else ""
        lines.append(f"| {row['size']} px, {row['steps']} | {row['precision']} | {o['seconds']:.1f} s | "
                     f"{d['seconds']:.1f} s | {row['ratio']:.2f} | {o['cpu_seconds'] / d['cpu_seconds']:.2f} | "
                     f"{o['peak_rss_gb']:.2f} GB | {d['peak_rss_gb']:.2f} GB | {quality} | {parity} | "
                     f"{len(o.get('runs', [o]))} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- FLOPs and the machine's peak

def matmul_peak(n: int = 4096, repeats: int = 5) -> dict:
    """fp32 matmul rates in GFLOP/s (wall and per CPU second) of an n x n x n product: torch.mm (MKL's sgemm)
    and oneDNN's matmul on a pre-packed weight. MKL takes a slower code path on some CPUs (AMD's), so the
    machine's peak is the faster of the two."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
    rates = {}
    for name, fn in (("mkl", lambda: torch.mm(a, b)),
                     ("onednn", lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))):
        result = timed(fn, repeats)
        rates[name] = 2 * n**3 / result["seconds"] / 1e9
        rates[f"{name}_per_cpu_second"] = 2 * n**3 / result["cpu_seconds"] / 1e9
    return rates


def network_flops(task: str, size: int) -> float:
    """FLOPs of one UNet step (batch 2) or VAE decode (batch 1) of our model, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.models.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        if task == "unet":
            net = UNet2DConditionModel(UNetConfig.sd15())
            call, args = net, (torch.randn(2, 4, size // 8, size // 8), torch.tensor([500.0, 500.0]),
                               torch.randn(2, 77, 768))
        else:
            net = AutoencoderKL(VAEConfig.sd())
            call, args = net.decode, (torch.randn(1, 4, size // 8, size // 8),)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            call(*args)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- the run and its report

def benchmarks(quick: bool) -> list[dict]:
    """What to measure: (task, size, repeats, row label)."""
    sizes = [256] if quick else [256, 512]
    repeats = 2 if quick else 3
    rows = []
    for size in sizes:
        rows.append({"task": "unet", "size": size, "repeats": repeats if size == 256 else 2,
                     "label": f"UNet step, {size} px, batch 2"})
    for size in sizes:
        rows.append({"task": "vae", "size": size, "repeats": repeats if size == 256 else 2,
                     "label": f"VAE decode, {size} px"})
    rows.append({"task": "text", "size": 0, "repeats": 5, "label": "text encoder, batch 2 x 77 tokens"})
    rows.append({"task": "txt2img", "size": 256, "repeats": 1, "label": f"txt2img 256 px, {STEPS} Euler steps, CFG"})
    rows.append({"task": "train", "size": 0, "repeats": 5 if quick else 10,
                 "label": "training step, built-in UNet, batch 32"})
    return rows


def run(quick: bool, weights: Path) -> dict:
    """Every measurement, both sides, plus the machine's matmul peak and the FLOP counts."""
    import diffusers

    started, load = time.time(), os.getloadavg()
    folder = make_weights(weights)
    peaks = matmul_peak()
    print(f"fp32 matmul GFLOP/s: {peaks}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in benchmarks(quick):
            sides = {}
            for side in ("ours", "diffusers"):
                output = Path(tmp) / f"{side}.pt"
                sides[side] = run_worker({**row, "side": side, "weights": str(folder), "output": str(output)})
                sides[side]["output"] = torch.load(output)
            ours, ref = sides["ours"].pop("output"), sides["diffusers"].pop("output")
            row = {**row, **sides, "ratio": sides["ours"]["seconds"] / sides["diffusers"]["seconds"],
                   "max_abs_diff": float((ours.double() - ref.double()).abs().max()) if row["task"] != "train"
                   else None}
            if row["task"] in ("unet", "vae"):
                row["gflop"] = network_flops(row["task"], row["size"]) / 1e9
            rows.append(row)
            print(f"{row['label']}: ours {sides['ours']['seconds']:.3f} s, diffusers "
                  f"{sides['diffusers']['seconds']:.3f} s, ratio {row['ratio']:.2f}", flush=True)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "diffusers": diffusers.__version__, "python": platform.python_version(), "matmul_gflops": peaks,
               "load_average_at_start": load, "load_average_at_end": os.getloadavg()}
    return {"machine": machine,
            "quick": quick, "minutes": (time.time() - started) / 60, "rows": rows}


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's description)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rate(row: dict, side: str, peak: float) -> str:
    """Achieved GFLOP per CPU second and its share of the matmul peak per CPU second."""
    if "gflop" not in row:
        return ""
    achieved = row["gflop"] / row[side]["cpu_seconds"]
    return f"{achieved:.0f} ({100 * achieved / peak:.0f}%)"


def markdown(report: dict) -> str:
    """The results as markdown tables."""
    m = report["machine"]
    rates = m["matmul_gflops"]
    peak = max(rates["mkl_per_cpu_second"], rates["onednn_per_cpu_second"])
    lines = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, diffusers {m['diffusers']}. "
             f"{'Quick' if report['quick'] else 'Full'} run, {report['minutes']:.0f} minutes; load average "
             f"{m['load_average_at_start'][0]:.1f} at the start, {m['load_average_at_end'][0]:.1f} at the end "
             f"(other jobs on the machine slow both sides). fp32 matmul, 4096^3: torch.mm (MKL) "
             f"{rates['mkl']:.0f} GFLOP/s wall, {rates['mkl_per_cpu_second']:.0f} per CPU second; oneDNN "
             f"{rates['onednn']:.0f} GFLOP/s wall, {rates['onednn_per_cpu_second']:.0f} per CPU second (the peak "
             f"used below). Times are wall-clock medians; the CPU-time ratio is less disturbed by other jobs.", "",
             "| benchmark | ours | diffusers | ours / diffusers (wall) | ours / diffusers (CPU time) | "
             "ours GFLOP per CPU s (% of peak) | diffusers GFLOP per CPU s (% of peak) | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        o, d = row["ours"], row["diffusers"]
        if row["task"] == "train":
            o_text, d_text = f"{1 / o['seconds']:.2f} steps/s", f"{1 / d['seconds']:.2f} steps/s"
        else:
            o_text, d_text = f"{o['seconds']:.3f} s", f"{d['seconds']:.3f} s"
        diff = "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2g}"
        if row["task"] == "txt2img" and diff:
            diff += " (0-255 pixels)"
        lines.append(f"| {row['label']} | {o_text} | {d_text} | {row['ratio']:.2f} | "
                     f"{o['cpu_seconds'] / d['cpu_seconds']:.2f} | {rate(row, 'ours', peak)} | "
                     f"{rate(row, 'diffusers', peak)} | {diff} |")
    lines += ["", "| benchmark | ours warm-up | diffusers warm-up | ours peak RSS | diffusers peak RSS |",
              "|---|---:|---:|---:|---:|"]
    for row in report["rows"]:
        o, d = row["ours"], row["diffusers"]
        lines.append(f"| {row['label']} | {o['warmup']:.2f} s | {d['warmup']:.2f} s | {o['peak_rss_gb']:.2f} GB | "
                     f"{d['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 px only, fewer repeats")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="where the random model is kept")
    parser.add_argument("--output", type=Path, default=DOCS / "performance",
                        help="writes OUTPUT.json and the tables into OUTPUT.md")
    parser.add_argument("--whole", action="store_true",
                        help="only the whole-process rows (import + load + generate + save, one image per process)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="whole-process image sizes")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 20], help="whole-process DDIM step counts")
    parser.add_argument("--repeats", type=int, default=3, help="whole-process runs per side and row (medians)")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                        help="whole-process model: SD 1.5-sized (default) or SDXL base-sized, random weights")
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="whole-process precisions")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.whole:
        sdxl = args.family == "sdxl"
        weights = SDXL_WEIGHTS if sdxl and args.weights == WEIGHTS else args.weights
        rows = run_whole(make_weights(weights, args.family), args.sizes, args.steps, args.repeats,
                         tuple(args.precisions))
        suffix = ".whole-sdxl.json" if sdxl else ".whole.json"
        args.output.with_suffix(suffix).write_text(json.dumps(rows, indent=2) + "\n")
        table = whole_markdown(rows)
        print(table)
        markers = (SDXL_BEGIN, SDXL_END) if sdxl else (WHOLE_BEGIN, WHOLE_END)
        return write_table(args.output.with_suffix(".md"), table, *markers)
    report = run(args.quick, args.weights)
    table = markdown(report)
    print(table)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_table(args.output.with_suffix(".md"), table)


def write_table(path: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Put the tables between the begin / end markers of the notes (the prose around them stays)."""
    text = path.read_text() if path.is_file() else f"# Performance\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{table}{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    main()
