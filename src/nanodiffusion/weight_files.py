"""Which files hold a model's weights, found without importing torch, and reading them ahead into the page cache.

A diffusers folder keeps each part (unet/, vae/, text_encoder/, ...) in one weights file, or in shards named by an
index file when the part is big (diffusers and transformers split parts over 10 GB / 5 GB). `prefetch` starts a
background thread to read those files through, so the disk works while Python imports torch and builds the
networks: a load that finds the files evicted from the page cache waits less. (posix_fadvise / madvise WILLNEED
were tried first: on this project's VM they read a few megabytes, not the file.)
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .errors import NanoDiffusionError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


def shard_index_name(weights_name: str) -> str:
    """The index of a sharded part: model.safetensors -> model.safetensors.index.json, and the variant
    model.fp16.safetensors -> model.safetensors.index.fp16.json (diffusers' and transformers' naming)."""
    stem, *variant, suffix = weights_name.split(".")
    return ".".join([stem, suffix, "index", *variant, "json"])


def part_weights(folder: Path) -> Path:
    """A part's weights file, preferring safetensors over pickles and fp32 over the .fp16 variant; a part saved in
    shards is its shard index, NAME.index[.variant].json."""
    candidates = [folder / c for name in WEIGHT_NAMES for c in (name, shard_index_name(name))]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise NanoDiffusionError(f"{folder}: no weights file (expected one of {', '.join(WEIGHT_NAMES[:2])}, ...)")
    return found


def weight_files(path: Path) -> list[Path]:
    """The files a load of `path` (a checkpoint file, or a diffusers folder) reads its tensors from."""
    if not path.is_dir():
        return [path]
    found = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            weights = part_weights(folder)
        except NanoDiffusionError:
            continue   # tokenizer/, scheduler/: no weights
        if weights.name.endswith(".json"):
            try:
                shards = dict.fromkeys(weight_map(weights).values())
            except NanoDiffusionError:
                continue   # a broken index is reported by the load itself
            found += [folder / name for name in shards if (folder / name).is_file()]
        else:
            found.append(weights)
    return found


def weight_map(index: Path) -> dict[str, str]:
    """A shard index's "weight_map": tensor name -> the shard file (in the index's folder) that holds it."""
    try:
        mapping = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as e:
        raise NanoDiffusionError(f"{index}: unreadable shard index ({e}); the folder is damaged") from None
    if not isinstance(mapping, dict) or not mapping:
        raise NanoDiffusionError(f"{index}: not a shard index (no \"weight_map\" of tensor names to files); the "
                                 "folder is damaged")
    return mapping


def read_through(file: Path, chunk: int = 8 << 20) -> None:
    """Read a file once from start to end, so its pages sit in the page cache when the loader maps it."""
    buffer = bytearray(chunk)
    try:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    except OSError:
        pass   # the load reports unreadable files


def read_ahead(files: list[Path]) -> None:
    """Read every file through, in the order the loader will need them."""
    for file in files:
        read_through(file)


def prefetch(path: str | Path) -> threading.Thread | None:
    """Start reading a model's weight files into the page cache in a background thread, returned (None where the
    path is not a model, and where the files would fill over half of the RAM)."""
    if not Path(path).exists():
        return None
    files = weight_files(Path(path))
    if sum(file.stat().st_size for file in files) > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2:
        return None
    thread = threading.Thread(target=read_ahead, args=(files,), daemon=True)
    thread.start()
    return thread
