"""The `nanodiff` command: generate, train, serve, convert, info, eval.

Each subcommand imports what it needs when it runs, so `nanodiff generate` starts fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Callable

from .errors import NanoDiffusionError, choice_error


def _generate(args: argparse.Namespace) -> None:
    """txt2img / img2img / inpaint from the command line; writes PNGs with their parameters."""
    from .weight_files import prefetch

    for model in (args.model, args.refiner):
        if model is not None:
            prefetch(model)   # the disk reads the weights while torch imports
    from .images import image_grid, save_png
    from .lora_files import check_lora_weight, parse_lora_arg
    from .pipeline import Pipeline

    if args.prompt_flag is not None:
        if args.prompt is not None:
            raise NanoDiffusionError("two prompts given (one positional, one -p): give one")
        args.prompt = args.prompt_flag
    if (args.prompt is None) == (args.prompts is None):
        raise NanoDiffusionError("give either a prompt or --prompts FILE")
    loras = [parse_lora_arg(text) for text in args.lora]
    for file, weight in loras:
        check_lora_weight(weight, file)
    paths = output_paths(args.output, 1 if args.grid or args.xyz else args.batch * args.n_iter)
    args.axes = [xyz_axis(text) for text in args.xyz]
    if args.styles:
        from .styles import apply_styles, load_styles

        args.prompt, args.negative = apply_styles(args.prompt, args.negative, args.styles,
                                                  load_styles(args.styles_file))
    args.sampler, args.schedule = sampler_choice(args.sampler, args.schedule)
    pipe = Pipeline.load(args.model, tokenizer=args.tokenizer, prediction=args.prediction,
                         weights_dtype=args.weights_dtype, precision=args.precision, t5=args.t5)
    args.refiner_pipe = (Pipeline.load(args.refiner, weights_dtype=args.weights_dtype, precision=args.precision)
                         if args.refiner else None)
    pipe.fast = fast_options(args)
    pipe.loras = loras
    pipe.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if args.controlnet:
        from .controlnet_files import load_controlnet

        pipe.controlnet = load_controlnet(Path(args.controlnet))
    if args.prompts:
        from .batch import run_batch

        run_batch(pipe, args)
        return
    if args.axes:
        from .xyz import xyz_plot

        request = generation_request(args, pipe)
        base = {f.name: getattr(request, f.name) for f in fields(request) if getattr(request, f.name) is not None}
        images = [xyz_plot(pipe, base, args.axes)]
    else:
        images = pipe(generation_request(args, pipe))
    if args.grid and len(images) > 1:
        grid = image_grid(images)
        grid.info["parameters"] = images[0].info["parameters"]
        images = [grid]
    for image, path in zip(images, paths):
        save_png(image, path)
        print(path)


def generation_request(args: argparse.Namespace, pipe: object) -> object:
    """The GenerationRequest of `nanodiff generate`'s flags."""
    from .images import load_image
    from .request import GenerationRequest, HiresFix

    hires = None
    if args.hires_scale or args.hires_width or args.hires_height:
        hires = HiresFix(scale=args.hires_scale or 1.0, steps=args.hires_steps, strength=args.hires_strength,
                         upscaler=args.hires_upscaler, width=args.hires_width, height=args.hires_height)
    return GenerationRequest(
        args.prompt, args.negative, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
        cfg=args.cfg, layout_cfg=args.layout_cfg, seed=args.seed, width=args.width, height=args.height,
        batch=args.batch, n_iter=args.n_iter,
        init_image=load_image(args.init) if args.init else None, strength=args.strength,
        mask=load_image(args.mask) if args.mask else None, mask_only=args.mask_only, mask_padding=args.mask_padding,
        clip_skip=args.clip_skip, eta=args.eta,
        control_image=load_image(args.control_image) if args.control_image else None,
        control_scale=args.control_scale, subseed=args.subseed, subseed_strength=args.subseed_strength,
        hires=hires, tiling=args.tiling,
        refiner=getattr(args, "refiner_pipe", None), refiner_switch_at=args.refiner_switch_at,
        callback=preview_writer(pipe, Path(args.preview)) if args.preview else None, progress=True)


def xyz_axis(text: str) -> tuple[str, list]:
    """--xyz NAME=VALUES (the web UI's value syntax: 1-5, 1-5 (+2), 1-10 [5], a, b, c) -> an X/Y/Z plot axis."""
    from .xyz import parse_axis

    name, sep, values = text.partition("=")
    if not sep:
        raise NanoDiffusionError(f"--xyz {text!r} is not NAME=VALUES: write e.g. --xyz cfg=1,3,7 --xyz steps=4-20 [3]")
    return name.strip(), parse_axis(name.strip(), values)


def sampler_choice(sampler: str | None, schedule: str) -> tuple[str | None, str]:
    """--sampler / --schedule as people type them (the web UI's names and aliases, "DPM++ 2M Karras", "Karras",
    our ids) -> (our sampler id or None for the model's default, our sigma spacing); unknown names are errors."""
    from .sampler_names import WEB_SAMPLERS, WEB_SCHEDULERS, resolve_sampler

    key, spacing, problems = resolve_sampler(sampler or "Euler a", schedule)
    if problems and problems[0].startswith("sampler"):
        raise choice_error("sampler", sampler, [s.name for s in WEB_SAMPLERS if s.ours])
    if problems:   # the schedule, or a sampler name's schedule suffix, is unknown or not implemented here
        raise NanoDiffusionError(f"{problems[0].split(':')[0]}; choose one of: "
                                 + ", ".join(s.label for s in WEB_SCHEDULERS if s.ours))
    return (key if sampler else None), spacing


def output_paths(output: str, count: int) -> list[Path]:
    """The PNG files -o names (a batch: NAME-00.png, ...), checked writable before any work: not empty, not a
    folder, in a folder that exists or can be made and takes a new file."""
    if not output.strip():
        raise NanoDiffusionError("-o is empty: pass a file name such as out.png")
    out = Path(output)
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i:02d}{out.suffix or '.png'}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise NanoDiffusionError(f"-o {path} is a folder: pass a file name such as {path / 'out.png'}")
    check_writable_folder(out.parent, f"-o {out}")
    return paths


def check_writable_folder(folder: Path, what: str) -> None:
    """Make `folder` if needed and write (then remove) a probe file in it; a clear error if either fails."""
    probe = folder / f".nanodiff-probe-{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.open("wb").close()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise NanoDiffusionError(f"cannot write {what}: {folder} is not a folder (a file is in the way)") from None
    except OSError as error:
        raise NanoDiffusionError(f"cannot write {what}: {error.strerror or error} ({folder})") from None


def fast_options(args: argparse.Namespace):
    """The approximate fast paths the flags ask for: the --fast preset, then each flag given overriding it."""
    import dataclasses

    from .fast import FastOptions

    options = FastOptions.preset() if args.fast else FastOptions()
    chosen = {"deepcache": args.deepcache, "tome": args.tome, "cfg_cutoff": args.cfg_cutoff}
    return dataclasses.replace(options, **{name: value for name, value in chosen.items() if value is not None})


def preview_writer(pipe, path: Path):
    """A progress callback that writes the step's x0 estimate through the cheap preview decoder to `path`."""
    from .images import save_png

    def write(step: int, total: int, x0) -> None:
        save_png(pipe.preview(x0[:1])[0], path)

    return write


def _info(args: argparse.Namespace) -> None:
    """Print what a checkpoint file or folder holds."""
    import json

    from .checkpoints import describe

    print(json.dumps(describe(Path(args.path)), indent=2))


def _convert(args: argparse.Namespace) -> None:
    """Convert between an original single file and a diffusers folder."""
    from .checkpoints import convert

    convert(Path(args.source), Path(args.destination), prediction=args.prediction)
    print(args.destination)


def _eval(args: argparse.Namespace) -> None:
    """Score generated images with the compositional evaluator (or generate them first)."""
    from .evaluate_model import run_eval

    run_eval(args)


def _train(args: argparse.Namespace, rest: list[str]) -> None:
    """Train the VAE or the diffusion model (see docs/builtin.md)."""
    from .train import cli as train_cli

    train_cli.main([args.kind, *rest])


def _finetune(args: argparse.Namespace, rest: list[str]) -> None:
    """LoRA or DreamBooth fine-tuning (see docs/finetune.md)."""
    from .train.finetune import main as finetune_main

    finetune_main([args.kind, *rest])


def _stream(args: argparse.Namespace, rest: list[str]) -> None:
    """Real-time img2img over a video or an image folder (stream.py)."""
    from .stream import main as stream_main

    stream_main(rest)


def _serve(args: argparse.Namespace) -> None:
    """Start the web UI and HTTP API (the outputs folder and the port are checked before the model loads)."""
    from .server.app import serve

    check_writable_folder(Path(args.outputs), f"--outputs {args.outputs}")
    check_port_free("0.0.0.0" if args.listen else args.host, args.port)
    serve(args)


def check_port_free(host: str, port: int) -> None:
    """Bind (and release) host:port the way the server will, so a port in use fails before the banner."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing socket is no conflict
            sock.bind(address)
    except OSError as error:
        raise NanoDiffusionError(f"cannot listen on {host}:{port}: {error.strerror or error} (another server on "
                                 "that port? pass --port N)") from None


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: use a finite number")
    return value


def bounded_int(low: int, high: int, hint: str) -> Callable[[str], int]:
    """argparse type: an integer from low to high."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: {hint}")
        return value

    parse.__name__ = "integer"
    return parse


SEED = bounded_int(-1, 2**64 - 1, "use -1 (random) or 0 to 2**64-1")
PORT = bounded_int(1, 65535, "use a port from 1 to 65535")


def _learn(args: argparse.Namespace) -> None:
    """List the lessons, or run one (see docs/learn/)."""
    from . import learn

    print(learn.run_lesson(args.lesson, args.output) if args.lesson else learn.listing())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="nanodiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("-p", "--prompt", dest="prompt_flag", default=None, metavar="PROMPT",
                     help="the prompt, as a flag (instead of the positional one)")
    gen.add_argument("--prompts", default=None, metavar="FILE",
                     help="batch: one prompt (or JSON object of settings) per line; works under accelerate launch")
    gen.add_argument("--outdir", default="outputs", help="batch: folder for the images (re-runs skip done ones)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (batch: NAME-00.png, ...)")
    gen.add_argument("-m", "--model", default=None, help="diffusers folder or .safetensors/.ckpt file "
                     "(default: the built-in model)")
    gen.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt")
    gen.add_argument("--refiner", default=None, metavar="MODEL",
                     help="SDXL refiner (folder or file) that runs the last part of the schedule")
    gen.add_argument("--refiner-switch-at", type=finite_float, default=0.8, metavar="F",
                     help="fraction of the schedule the base model runs before the refiner takes over")
    gen.add_argument("--t5", action=argparse.BooleanOptionalAction, default=None,
                     help="SD3: use the T5 text encoder (--no-t5: leave it out, less memory; default: if present)")
    gen.add_argument("-n", "--negative", "--negative-prompt", default="", help="negative prompt")
    gen.add_argument("--sampler", default=None, help="sampler id or web-UI name (default: the model's, Euler a)")
    gen.add_argument("--schedule", "--scheduler", default="default",
                     help="sigma spacing: default, karras, exponential")
    gen.add_argument("-s", "--steps", type=int, default=None, help="sampling steps (default: the model's, 20)")
    gen.add_argument("--cfg", "--cfg-scale", "--guidance-scale", type=finite_float, default=None,
                     help="classifier-free guidance scale")
    gen.add_argument("--layout-cfg", type=finite_float, default=None, metavar="S",
                     help="a layout model's slot-map guidance scale (the built-in model; default: its own)")
    gen.add_argument("--seed", type=SEED, default=None, help="-1 or none: random")
    gen.add_argument("-W", "--width", type=int, default=None)
    gen.add_argument("-H", "--height", type=int, default=None)
    gen.add_argument("--batch", "--batch-size", type=int, default=1, help="images per iteration")
    gen.add_argument("--n-iter", "--batch-count", type=int, default=1, help="iterations (batch count)")
    gen.add_argument("--subseed", type=SEED, default=None, help="variation seed (-1 or none: random)")
    gen.add_argument("--subseed-strength", type=finite_float, default=0.0,
                     help="how far towards the variation seed's image: 0 (none) to 1")
    gen.add_argument("--tiling", action="store_true", help="seamless tiling (circular padding)")
    hires = gen.add_argument_group("hires fix: sample small, upscale, then an img2img pass at the larger size")
    hires.add_argument("--hires-scale", type=finite_float, default=0.0, metavar="F", help="upscale factor (e.g. 2)")
    hires.add_argument("--hires-width", type=int, default=0)
    hires.add_argument("--hires-height", type=int, default=0)
    hires.add_argument("--hires-steps", type=int, default=0, help="second-pass steps (0: the first pass's)")
    hires.add_argument("--hires-strength", type=finite_float, default=0.7, help="second-pass denoising strength")
    hires.add_argument("--hires-upscaler", default="latent", choices=["latent", "latent-nearest", "lanczos"])
    gen.add_argument("--grid", action="store_true", help="write the batch as one grid image")
    gen.add_argument("--xyz", action="append", default=[], metavar="NAME=VALUES",
                     help="X/Y/Z plot axis (repeat for Y and Z), e.g. cfg=1,3,7 or steps=4-20 [3]: one labelled grid")
    gen.add_argument("--style", dest="styles", action="append", default=[], metavar="NAME",
                     help="apply a prompt style from --styles-file (repeatable)")
    gen.add_argument("--styles-file", default=None, metavar="CSV", help="the web UI's styles.csv")
    gen.add_argument("--init", default=None, help="init image for img2img")
    gen.add_argument("--strength", type=finite_float, default=0.75)
    gen.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    gen.add_argument("--mask-only", action="store_true",
                     help="inpaint the masked area only, at the full size (the web UI's \"Only masked\")")
    gen.add_argument("--mask-padding", type=int, default=32, help="pixels of context around the mask (--mask-only)")
    gen.add_argument("--clip-skip", type=int, default=1)
    gen.add_argument("--eta", type=finite_float, default=None,
                     help="noise of stochastic samplers: 0 deterministic, 1 ancestral / SDE (their default)")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="apply a LoRA (kohya or diffusers/PEFT file); repeatable")
    gen.add_argument("--lora-dir", default=None, help="folder that <lora:NAME:W> prompt tags resolve in")
    gen.add_argument("--controlnet", default=None, help="ControlNet (diffusers folder or original single file)")
    gen.add_argument("--control-image", default=None, help="the ControlNet's conditioning image")
    gen.add_argument("--control-scale", type=finite_float, default=1.0)
    gen.add_argument("--prediction", default=None, choices=["epsilon", "v_prediction"],
                     help="override the checkpoint's prediction type (SD 2.x 768 models: v_prediction)")
    fast = gen.add_argument_group("approximate fast paths (off by default; docs/fast.md has their cost)")
    fast.add_argument("--fast", action="store_true", help="the measured preset (the flags below override it)")
    fast.add_argument("--deepcache", type=int, default=None, metavar="N",
                      help="DeepCache: the whole UNet every N-th call, its top level alone in between")
    fast.add_argument("--tome", type=finite_float, default=None, metavar="R",
                      help="token merging: merge this share of the top-level tokens before self-attention")
    fast.add_argument("--cfg-cutoff", type=finite_float, default=None, metavar="F",
                      help="guidance on the first F of the steps only (the rest skip the unconditional pass)")
    fast.add_argument("--preview", default=None, metavar="PNG",
                      help="write a cheap preview of every step's x0 estimate here (no VAE run)")
    gen.add_argument("--weights-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="store the conv / linear weights in this dtype (compute stays float32; half the memory)")
    add_precision(gen)
    gen.set_defaults(run=_generate)

    info = sub.add_parser("info", help="describe a checkpoint file or folder")
    info.add_argument("path")
    info.set_defaults(run=_info)

    conv = sub.add_parser("convert", help="single file <-> diffusers folder")
    conv.add_argument("source")
    conv.add_argument("destination")
    conv.add_argument("--prediction", default=None, choices=["epsilon", "v_prediction"])
    conv.set_defaults(run=_convert)

    ev = sub.add_parser("eval", help="score images with the compositional evaluator")
    ev.add_argument("folder", nargs="?", default=None, help="folder of PNGs to score")
    ev.add_argument("--generate", type=int, default=0, metavar="N",
                    help="first generate N held-out prompts with --model into the folder")
    ev.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ev.add_argument("--model", default=None)
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--cfg", type=finite_float, default=None)
    ev.add_argument("--layout-cfg", type=finite_float, default=None)
    ev.add_argument("--sampler", default="euler_a")
    ev.add_argument("--seed", type=SEED, default=0)
    ev.add_argument("--markdown", default=None, help="also write the table to this file")
    add_precision(ev)
    ev.set_defaults(run=_eval)

    train = sub.add_parser("train", add_help=False,
                           help="train a VAE, a diffusion model, a ControlNet, or the built-in model (VAE + diffusion)")
    train.add_argument("kind", help="vae, diffusion, controlnet or builtin (then its own flags; --help lists them)")
    train.set_defaults(run=_train)

    finetune = sub.add_parser("finetune", help="LoRA or DreamBooth fine-tuning on captioned images",
                              add_help=False)
    finetune.add_argument("kind", help="lora or dreambooth (then its own flags; --help lists them)")
    finetune.set_defaults(run=_finetune)

    learn = sub.add_parser("learn", help="the learning path: list the lessons, or run one (trains on the CPU)")
    learn.add_argument("lesson", nargs="?", default=None)
    learn.add_argument("-o", "--output", default="learn", help="folder for the lesson's page and pictures")
    learn.set_defaults(run=_learn)

    serve = sub.add_parser("serve", help="web UI + /sdapi/v1 HTTP API", allow_abbrev=False)
    serve.add_argument("--model", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=PORT, default=7860)
    serve.add_argument("--listen", action="store_true", help="listen on 0.0.0.0")
    serve.add_argument("--api", action="store_true", help="accepted for the web UI's habit: the API is always served")
    serve.add_argument("--api-auth", default=None, metavar="USER:PASS", help="lock the API (--gradio-auth: the page)")
    serve.add_argument("--gradio-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                       help="lock the web page (--api-auth locks the API)")
    serve.add_argument("--cors-allow-origins", default=None, metavar="ORIGIN[,ORIGIN]",
                       help="origins whose browser pages may call the API (off by default)")
    serve.add_argument("--cors-allow-origins-regex", default=None, metavar="REGEX",
                       help="origins matching this regex may call the API (off by default)")
    serve.add_argument("--models-dir", default=None, metavar="DIR",
                       help="checkpoints to switch between (options.sd_model_checkpoint); loaded on first use")
    serve.add_argument("--styles-file", default=None, metavar="CSV",
                       help="prompt styles, the web UI's styles.csv (name,prompt,negative_prompt)")
    serve.add_argument("--outputs", default="outputs")
    serve.add_argument("--lora-dir", default=None, help="folder that <lora:NAME:W> prompt tags resolve in")
    serve.add_argument("--controlnet", default=None, help="ControlNet to load (diffusers folder or single file)")
    add_precision(serve)
    serve.set_defaults(run=_serve)
    stream = sub.add_parser("stream", add_help=False,
                            help="real-time img2img of a video or an image folder (its own flags; --help lists them)")
    stream.set_defaults(run=_stream)
    return parser


def add_precision(command: argparse.ArgumentParser) -> None:
    """--precision: the UNet / VAE compute precision (precision.py)."""
    command.add_argument("--precision", default=None, choices=["float32", "bfloat16"],
                         help="compute precision (default: bfloat16 for SD-size models on CPUs with AVX512-BF16 "
                         "or AMX, else float32; float32 is the path proven identical to diffusers)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nanodiff`; user errors print one line and exit 2."""
    parser = build_parser()
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "finetune", "stream"):
            args.run(args, rest)
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        else:
            args.run(args)
    except NanoDiffusionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
