"""The one training loop every objective shares, on accelerate (single process, DDP, mixed precision).

An objective is an `nn.Module` whose forward takes a batch and returns `(loss, logs)`, so DDP wraps
it whole. Each step: warm-up + cosine learning rate, `grad_accum` micro-batches (gradients synced
on the last one only), clipping, AdamW, EMA. Every `log_every` steps a CSV row, every
`checkpoint_every` steps the training state (weights, optimizer, EMA, RNG of every process; state.py:
safetensors + JSON, never pickles) written atomically (a temporary folder renamed into place), every `preview_every` steps a preview image.
Starting again in the same output folder resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from ..errors import NanoDiffusionError
from .ema import EMA
from .lr import lr_factor
from .state import Stateful, load_training_state, save_training_state

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[int, int, int, int], Batch]  # (step, micro, rank, world) -> batch
ModelFn = Callable[[nn.Module, Path], None]  # (EMA objective, path), main process only

_CHECKPOINT = re.compile(r"^step-(\d+)$")


@dataclass
class TrainConfig:
    """Settings shared by every training run (the CLI flags of `nanodiff train`)."""

    output: Path
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    log_every: int = 10
    checkpoint_every: int = 500
    preview_every: int = 500  # 0: no previews
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        check_config(self)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that would crash or silently break a run (zero counts, non-finite rates) before it starts."""
    counts = {"--steps": config.steps, "--batch-size": config.batch_size, "--grad-accum": config.grad_accum,
              "--log-every": config.log_every, "--checkpoint-every": config.checkpoint_every,
              "--keep-checkpoints": config.keep_checkpoints}
    for flag, value in counts.items():
        if value < 1:
            raise NanoDiffusionError(f"{flag} {value} is not allowed: use 1 or more")
    if config.warmup < 0 or config.preview_every < 0:
        raise NanoDiffusionError("--warmup and --preview-every must not be negative (--preview-every 0: no previews)")
    if config.threads is not None and config.threads < 1:
        raise NanoDiffusionError(f"--threads {config.threads} is not allowed: use 1 or more")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise NanoDiffusionError(f"--lr {config.lr} is not allowed: use a positive number such as 1e-4")
    if not 0 <= config.ema_decay <= 1:
        raise NanoDiffusionError(f"--ema-decay {config.ema_decay} is not allowed: use a number from 0 to 1")
    finite = {"weight_decay": config.weight_decay, "grad_clip": config.grad_clip, "min_lr_ratio": config.min_lr_ratio}
    for name, value in finite.items():
        if not (math.isfinite(value) and value >= 0):
            raise NanoDiffusionError(f"{name} {value} is not allowed: use a finite number, 0 or more")


class Progress:
    """The optimizer step counter, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def last_checkpoint(output: Path) -> Path | None:
    """The newest complete `step-N` folder under output/checkpoints (temporary folders are skipped)."""
    root = Path(output) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save_checkpoint(accelerator: Accelerator, output: Path, step: int, keep: int, model: nn.Module,
                    objects: dict[str, Stateful]) -> Path:
    """Write the full training state (state.py: safetensors + JSON) to a temporary folder, then rename it into
    place; prune old ones."""
    root = Path(output) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_training_state(tmp, accelerator.unwrap_model(model), objects, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(p for p in root.glob("step-*") if _CHECKPOINT.match(p.name))[:-keep]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CSVLog:
    """Append-only CSV of training metrics (one row per `log_every` steps)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run repeats them from its checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
        self.path.write_text("".join(kept))

    def write(self, row: dict[str, float]) -> None:
        new = not self.path.exists()
        if self.fields is None:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def train(objective: nn.Module, batches: BatchFn, config: TrainConfig, *,
          preview: ModelFn | None = None, finish: ModelFn | None = None) -> nn.Module:
    """Train `objective` for config.steps optimizer steps (resuming if possible); returns its EMA copy."""
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    output = Path(config.output)
    if accelerator.is_main_process:
        (output / "previews").mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes

    optimizer = torch.optim.AdamW(objective.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(objective, config.ema_decay)
    model, optimizer = accelerator.prepare(objective, optimizer)
    ema.model.load_state_dict(accelerator.unwrap_model(model).state_dict())  # rank 0's weights after DDP's broadcast
    progress = Progress()
    state = {"optimizer": optimizer, "ema": ema, "progress": progress,
             **({"scaler": accelerator.scaler} if accelerator.scaler is not None else {})}
    set_seed(config.seed + rank)

    resume = last_checkpoint(output)
    if resume is not None:
        load_training_state(resume, accelerator.unwrap_model(model), state, rank)
        accelerator.print(f"resumed from {resume} (step {progress.step})")

    log = CSVLog(output / "log.csv")
    if accelerator.is_main_process:
        log.truncate_after(progress.step)
    bar = tqdm(total=config.steps, initial=progress.step, disable=not accelerator.is_main_process,
               desc=f"train {output.name}", dynamic_ncols=True)
    sums: dict[str, float] = {}
    count = 0
    started = last = time.time()
    model.train()
    while progress.step < config.steps:
        step = progress.step
        lr = config.lr * lr_factor(step, config.warmup, config.steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(config.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in batches(step, micro, rank, world).items()}
            sync = micro == config.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                loss, logs = model(batch)
                accelerator.backward(loss / config.grad_accum)
            for key, value in {"loss": loss, **logs}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / config.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(model))
        progress.step += 1
        count += 1
        bar.update(1)

        if progress.step % config.log_every == 0 or progress.step == config.steps:
            means = {k: v / count for k, v in sums.items()}
            now = time.time()
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}")
            if accelerator.is_main_process:
                log.write({"step": progress.step, **{k: round(v, 6) for k, v in means.items()},
                           "lr": lr, "grad_norm": round(float(grad_norm), 4),
                           "sec_per_step": round((now - last) / count, 4), "elapsed_s": round(now - started, 1)})
            sums, count, last = {}, 0, now
        if progress.step % config.checkpoint_every == 0 or progress.step == config.steps:
            save_checkpoint(accelerator, output, progress.step, config.keep_checkpoints, model, state)
        if preview is not None and config.preview_every > 0 and accelerator.is_main_process and (
                progress.step % config.preview_every == 0 or progress.step == config.steps):
            try:
                preview(ema.model, output / "previews" / f"step-{progress.step:07d}.png")
            except Exception as error:  # a broken preview must not cost the training run
                bar.write(f"preview failed at step {progress.step}: {error!r}")
    bar.close()
    if finish is not None and accelerator.is_main_process:
        finish(ema.model, output)
    accelerator.wait_for_everyone()
    AcceleratorState._reset_state()  # the next stage in this process may use another mixed precision
    return ema.model


def config_dict(config: TrainConfig) -> dict:
    """The config as JSON-ready values (written next to the run for the record)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
