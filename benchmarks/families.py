"""One denoiser step of SDXL's UNet and SD3-medium's MMDiT at real size, random weights, nanodiffusion vs diffusers.

For each family one random model is made by diffusers (fixed seed) and saved once as a diffusers folder (safetensors,
float32) in the temp directory; both sides load that folder. Every measurement runs in its own subprocess, one at a
time, so its peak RSS is that side's alone. One step = one forward at batch 1 on fixed random inputs:
  * SDXL base UNet (UNetConfig.sdxl()): latents [1, 4, s/8, s/8], timestep 500, context [1, 77, 2048], added
    conditioning text_embeds [1, 1280] and time_ids [1, 6] (size s, crop 0, target size s);
  * SD3 medium MMDiT (24 blocks, 1536 wide, patch 2): latents [1, 16, s/8, s/8], timestep 500, context
    [1, 333, 4096] (77 CLIP + 256 T5 tokens), pooled [1, 2048].
Ours is loaded as nanodiffusion's loader does it (built uninitialised, the file's tensors as parameters,
storage.store_weights, then precision.compute_in with set_precision's arguments: float32 packs the weights in
oneDNN's layout, bfloat16 packs them in bfloat16 and computes in it); diffusers' is `from_pretrained` with
torch_dtype float32 / bfloat16. Median wall and CPU seconds of the timed repeats after one warm-up, the warm-up
itself, peak RSS, max |ours - diffusers| of the outputs, and for bfloat16 each side's max |bf16 - diffusers fp32|.
Writes docs/performance.families.json after every row and the table into docs/performance.md (between markers).

    python benchmarks/families.py                          # 512 px rows, then 1024 px rows
    python benchmarks/families.py --sizes 512 --families sdxl --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from perf import run_worker, timed   # benchmarks/perf.py: a measurement's subprocess; warm-up, then medians

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
JSON_OUT = DOCS / "performance.families.json"
TMP = Path(tempfile.gettempdir())
BEGIN, END = "<!-- families.py results: begin -->", "<!-- families.py results: end -->"
FAMILIES = ("sdxl", "sd3")
LABEL = {"sdxl": "SDXL UNet", "sd3": "SD3-medium MMDiT"}
T5_TOKENS = 333   # SD3's joint context: 77 CLIP tokens + 256 T5 tokens
REPEATS = {512: 3, 1024: 2}


def sd3_medium_config() -> dict:
    """stabilityai/stable-diffusion-3-medium-diffusers' transformer config (2.0 B parameters)."""
    from nanodiffusion.models.mmdit import MMDiTConfig
    return MMDiTConfig(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                       pos_embed_max_size=192).to_dict()


def family_config(family: str) -> dict:
    from nanodiffusion.models.unet import UNetConfig
    return UNetConfig.sdxl().to_dict() if family == "sdxl" else sd3_medium_config()


def folder_of(family: str) -> Path:
    return TMP / f"nanodiffusion-families-{family}"


def make_weights(family: str) -> None:
    """The random diffusers model of `family` (seed 0), saved as float32 safetensors (kept between runs)."""
    import diffusers
    folder = folder_of(family)
    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    cls = diffusers.UNet2DConditionModel if family == "sdxl" else diffusers.SD3Transformer2DModel
    model = cls.from_config(family_config(family))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100GB")


# ---------------------------------------------------------------- one measurement (runs in a subprocess)

def inputs(family: str, size: int) -> tuple:
    """Fixed random inputs: (sample, timestep, context, extra conditioning tensors)."""
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    if family == "sdxl":
        sample = torch.randn(1, 4, latent, latent, generator=g)
        context = torch.randn(1, 77, 2048, generator=g)
        extra = {"text_embeds": torch.randn(1, 1280, generator=g),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}
    else:
        sample = torch.randn(1, 16, latent, latent, generator=g)
        context = torch.randn(1, T5_TOKENS, 4096, generator=g)
        extra = {"pooled_projections": torch.randn(1, 2048, generator=g)}
    return sample, torch.tensor([500.0]), context, extra


def load_ours(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """As loading.load_pipeline builds the network (build_network) and sets its precision (set_precision)."""
    from safetensors.torch import load_file

    from nanodiffusion.loading import build_network
    from nanodiffusion.models.mmdit import MMDiTConfig, SD3Transformer2DModel
    from nanodiffusion.models.unet import UNet2DConditionModel, UNetConfig
    from nanodiffusion.precision import compute_in

    folder = folder_of(family)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    part = "unet" if family == "sdxl" else "transformer"
    ckpt = SimpleNamespace(parts={part: state}, configs={part: json.loads((folder / "config.json").read_text())})
    config_cls, model_cls = (UNetConfig, UNet2DConditionModel) if family == "sdxl" else (MMDiTConfig,
                                                                                        SD3Transformer2DModel)
    model = build_network(ckpt, part, config_cls, model_cls, torch.float32)
    return compute_in(model, dtype, keep=("time_embedding", "add_embedding"), keep_args=(1,))


def worker(spec: dict) -> None:
    family, side, size, repeats = spec["family"], spec["side"], spec["size"], spec["repeats"]
    dtype = getattr(torch, spec["dtype"])
    start = time.perf_counter()
    if side == "diffusers":
        import diffusers
        cls = diffusers.UNet2DConditionModel if family == "sdxl" else diffusers.SD3Transformer2DModel
        net = cls.from_pretrained(folder_of(family), torch_dtype=dtype).eval().requires_grad_(False)
    else:
        net = load_ours(family, dtype)
    load_seconds = time.perf_counter() - start
    sample, t, context, extra = inputs(family, size)
    if side == "diffusers":
        sample, context = sample.to(dtype), context.to(dtype)
        extra = {k: v.to(dtype) for k, v in extra.items()}
        if family == "sdxl":
            def call():
                return net(sample, t, encoder_hidden_states=context, added_cond_kwargs=extra).sample.float()
        else:
            def call():
                return net(hidden_states=sample, timestep=t, encoder_hidden_states=context,
                           pooled_projections=extra["pooled_projections"]).sample.float()
    elif family == "sdxl":
        def call():
            return net(sample, t, context, **extra).float()
    else:
        def call():
            return net(sample, t, context, extra["pooled_projections"]).float()
    with torch.inference_mode():
        result = timed(call, repeats)
    out = result.pop("output")
    torch.save(out.contiguous(), spec["output"])
    print(json.dumps({**result, "load_seconds": load_seconds,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "output_abs_max": out.abs().max().item(), "finite": bool(torch.isfinite(out).all())}))


# ---------------------------------------------------------------- the table

def output_path(family: str, size: int, dtype: str, side: str) -> Path:
    return TMP / f"nanodiffusion-families-out-{family}-{size}-{dtype}-{side}.pt"


def max_diff(a: Path, b: Path) -> float | None:
    if not (a.is_file() and b.is_file()):
        return None
    return (torch.load(a) - torch.load(b)).abs().max().item()


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import diffusers
    return {"cpu": model, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "memory_gb": round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)}


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| family | px | dtype | ours s/step (CPU s) | diffusers s/step (CPU s) | ours / diffusers wall (CPU) "
             "| peak RSS ours / diffusers GB | max \\|ours - diffusers\\| | max \\|bf16 - diffusers fp32\\| ours / "
             "diffusers | repeats |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, d = r["ours"], r["diffusers"]
        bf = ("-" if r["dtype"] == "float32" else
              f"{fmt(r.get('ours_vs_diffusers_fp32'), '.3g')} / {fmt(r.get('diffusers_vs_diffusers_fp32'), '.3g')}")
        lines.append(f"| {LABEL[r['family']]} | {r['size']} | {r['dtype']} | "
                     f"{o['seconds']:.2f} ({o['cpu_seconds']:.2f}) | {d['seconds']:.2f} ({d['cpu_seconds']:.2f}) | "
                     f"**{r['ratio_wall']:.2f}** "
                     f"({r['ratio_cpu']:.2f}) | {o['peak_rss_gb']:.1f} / {d['peak_rss_gb']:.1f} | "
                     f"{fmt(r['max_abs_diff'], '.3g')} | {bf} | 1 + {r['repeats']} |")
    return "\n".join(lines)


def write_markdown(rows: list[dict]) -> None:
    path = DOCS / "performance.md"
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1]
        path.write_text(text)
    else:
        print("no result markers in docs/performance.md: the table is\n" + table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, help="timed repeats after the warm-up (default 3 at 512 px, else 2)")
    parser.add_argument("--no-markdown", action="store_true", help="only write the JSON")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    result = json.loads(JSON_OUT.read_text()) if JSON_OUT.is_file() else {}
    result["machine"] = machine()
    result["setup"] = {"batch": 1, "timestep": 500, "sdxl_context": [1, 77, 2048], "sd3_context": [1, T5_TOKENS, 4096],
                       "sd3_config": sd3_medium_config(), "warmup": 1, "repeats": REPEATS,
                       "weights": "random (diffusers init, seed 0), float32 safetensors"}
    rows = result.setdefault("rows", [])
    for family in args.families:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                        f"import families; families.make_weights({family!r})"], check=True)
        print(f"{family} weights ready ({time.perf_counter() - start:.0f} s)", flush=True)
    for size in args.sizes:
        for family in args.families:
            for dtype in args.dtypes:
                repeats = args.repeats or REPEATS.get(size, 2)
                row = {"family": family, "size": size, "dtype": dtype, "repeats": repeats}
                try:
                    for side in ("ours", "diffusers"):
                        spec = {"family": family, "side": side, "size": size, "dtype": dtype, "repeats": repeats,
                                "output": str(output_path(family, size, dtype, side))}
                        row[side] = run_worker(spec, __file__)
                        print(f"{family} {size} {dtype} {side}: {row[side]}", flush=True)
                except RuntimeError as error:
                    print(error, flush=True)
                    row["error"] = str(error)[-2000:]
                    result.setdefault("failed", []).append(row)
                    continue
                row["ratio_wall"] = row["ours"]["seconds"] / row["diffusers"]["seconds"]
                row["ratio_cpu"] = row["ours"]["cpu_seconds"] / row["diffusers"]["cpu_seconds"]
                row["max_abs_diff"] = max_diff(output_path(family, size, dtype, "ours"),
                                               output_path(family, size, dtype, "diffusers"))
                if dtype == "bfloat16":
                    ref = output_path(family, size, "float32", "diffusers")
                    row["ours_vs_diffusers_fp32"] = max_diff(output_path(family, size, dtype, "ours"), ref)
                    row["diffusers_vs_diffusers_fp32"] = max_diff(output_path(family, size, dtype, "diffusers"), ref)
                rows[:] = [r for r in rows if (r["family"], r["size"], r["dtype"]) != (family, size, dtype)]
                rows.append(row)
                rows.sort(key=lambda r: (r["size"], FAMILIES.index(r["family"]), r["dtype"] != "float32"))
                JSON_OUT.write_text(json.dumps(result, indent=1) + "\n")
                if not args.no_markdown:
                    write_markdown(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
