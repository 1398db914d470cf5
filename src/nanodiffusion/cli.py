"""The `nanodiff` command: generate, train, serve, convert, info, eval.

Each subcommand imports what it needs when it runs, so `nanodiff generate` starts fast.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import NanoDiffusionError


def _generate(args: argparse.Namespace) -> None:
    """txt2img / img2img / inpaint from the command line; writes PNGs with their parameters."""
    from .images import image_grid, load_image, save_png
    from .lora_files import parse_lora_arg
    from .pipeline import Pipeline

    pipe = Pipeline.load(args.model, tokenizer=args.tokenizer, prediction=args.prediction,
                         weights_dtype=args.weights_dtype)
    pipe.fast = fast_options(args)
    pipe.loras = [parse_lora_arg(text) for text in args.lora]
    pipe.lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if args.controlnet:
        from .controlnet_files import load_controlnet

        pipe.controlnet = load_controlnet(Path(args.controlnet))
    images = pipe(
        args.prompt, args.negative, steps=args.steps, sampler=args.sampler, schedule=args.schedule,
        cfg=args.cfg, seed=args.seed, width=args.width, height=args.height, batch=args.batch,
        init_image=load_image(args.init) if args.init else None, strength=args.strength,
        mask=load_image(args.mask) if args.mask else None, clip_skip=args.clip_skip, eta=args.eta,
        control_image=load_image(args.control_image) if args.control_image else None,
        control_scale=args.control_scale,
        callback=preview_writer(pipe, Path(args.preview)) if args.preview else None,
        progress=True,
    )
    out = Path(args.output)
    if args.grid and len(images) > 1:
        grid = image_grid(images)
        grid.info["parameters"] = images[0].info["parameters"]
        save_png(grid, out)
        print(out)
        return
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i:02d}{out.suffix or '.png'}")
        save_png(image, path)
        print(path)


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


def _serve(args: argparse.Namespace) -> None:
    """Start the web UI and HTTP API."""
    from .server.app import serve

    serve(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="nanodiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG (batch: NAME-00.png, ...)")
    gen.add_argument("--model", default=None, help="diffusers folder or .safetensors/.ckpt file "
                     "(default: the built-in model)")
    gen.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--sampler", default="euler_a")
    gen.add_argument("--schedule", default="default", help="sigma spacing: default, karras, exponential")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--grid", action="store_true", help="write the batch as one grid image")
    gen.add_argument("--init", default=None, help="init image for img2img")
    gen.add_argument("--strength", type=float, default=0.75)
    gen.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    gen.add_argument("--clip-skip", type=int, default=1)
    gen.add_argument("--eta", type=float, default=None,
                     help="noise of stochastic samplers: 0 deterministic, 1 ancestral / SDE (their default)")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="apply a LoRA (kohya or diffusers/PEFT file); repeatable")
    gen.add_argument("--lora-dir", default=None, help="folder that <lora:NAME:W> prompt tags resolve in")
    gen.add_argument("--controlnet", default=None, help="ControlNet (diffusers folder or original single file)")
    gen.add_argument("--control-image", default=None, help="the ControlNet's conditioning image")
    gen.add_argument("--control-scale", type=float, default=1.0)
    gen.add_argument("--prediction", default=None, choices=["epsilon", "v_prediction"],
                     help="override the checkpoint's prediction type (SD 2.x 768 models: v_prediction)")
    fast = gen.add_argument_group("approximate fast paths (off by default; docs/fast.md has their cost)")
    fast.add_argument("--fast", action="store_true", help="the measured preset (the flags below override it)")
    fast.add_argument("--deepcache", type=int, default=None, metavar="N",
                      help="DeepCache: the whole UNet every N-th call, its top level alone in between")
    fast.add_argument("--tome", type=float, default=None, metavar="R",
                      help="token merging: merge this share of the top-level tokens before self-attention")
    fast.add_argument("--cfg-cutoff", type=float, default=None, metavar="F",
                      help="guidance on the first F of the steps only (the rest skip the unconditional pass)")
    fast.add_argument("--preview", default=None, metavar="PNG",
                      help="write a cheap preview of every step's x0 estimate here (no VAE run)")
    gen.add_argument("--weights-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="store the conv / linear weights in this dtype (compute stays float32; half the memory)")
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
    ev.add_argument("--cfg", type=float, default=None)
    ev.add_argument("--sampler", default="euler_a")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--markdown", default=None, help="also write the table to this file")
    ev.set_defaults(run=_eval)

    train = sub.add_parser("train", add_help=False,
                           help="train a VAE, a diffusion model, a ControlNet, or the built-in model (VAE + diffusion)")
    train.add_argument("kind", help="vae, diffusion, controlnet or builtin (then its own flags; --help lists them)")
    train.set_defaults(run=_train)

    finetune = sub.add_parser("finetune", help="LoRA or DreamBooth fine-tuning on captioned images",
                              add_help=False)
    finetune.add_argument("kind", help="lora or dreambooth (then its own flags; --help lists them)")
    finetune.set_defaults(run=_finetune)

    serve = sub.add_parser("serve", help="web UI + /sdapi/v1 HTTP API")
    serve.add_argument("--model", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--listen", action="store_true", help="listen on 0.0.0.0")
    serve.add_argument("--api-auth", default=None, metavar="USER:PASS")
    serve.add_argument("--outputs", default="outputs")
    serve.add_argument("--lora-dir", default=None, help="folder that <lora:NAME:W> prompt tags resolve in")
    serve.add_argument("--controlnet", default=None, help="ControlNet to load (diffusers folder or single file)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nanodiff`; user errors print one line and exit 2."""
    parser = build_parser()
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "finetune"):
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
