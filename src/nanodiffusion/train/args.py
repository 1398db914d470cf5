"""Command-line flags shared by every training script."""

from __future__ import annotations

import argparse
from pathlib import Path

from .loop import TrainConfig


def add_common_arguments(parser: argparse.ArgumentParser, output: str, recipe: dict) -> None:
    """Data, length, optimisation, precision, output, checkpoint/preview cadence, seed (defaults: recipe)."""
    parser.add_argument("--data", default=None, help="image folder (default: synthetic captioned shapes)")
    parser.add_argument("--dataset-size", type=int, default=20_000, help="number of synthetic shapes scenes")
    parser.add_argument("--output", default=output, help="run folder; re-running resumes from its last checkpoint")
    parser.add_argument("--steps", type=int, default=recipe["steps"], help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=recipe["batch_size"],
                        help="images per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=recipe["lr"], help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=recipe["warmup"], help="linear warm-up steps before cosine decay")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--mixed-precision", default=recipe["mixed_precision"], choices=["no", "bf16", "fp16"])
    parser.add_argument("--checkpoint-every", type=int, default=recipe["checkpoint_every"])
    parser.add_argument("--preview-every", type=int, default=recipe["preview_every"], help="0: no previews")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe."""
    return TrainConfig(
        output=Path(args.output), steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay, mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every, preview_every=args.preview_every, log_every=args.log_every,
        seed=args.seed, threads=args.threads)
