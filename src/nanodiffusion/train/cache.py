"""Caches in a run folder (encoded latents, layout masks) keyed by a fingerprint of what they were computed from.

The fingerprint hashes the data (each image file's path, size and modification time, and its caption; or a
generated dataset's settings), the resolution, the encoder's weights and any other setting that changes the
result, so a cache is reused only while all of these are unchanged and recomputed (with a note) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from torch import nn

FINGERPRINT_KEY = "fingerprint"


def data_identity(dataset: object) -> dict:
    """What a dataset's items are a function of: its settings, and for an image folder every file and caption."""
    identity: dict = {"type": type(dataset).__name__}
    identity.update({k: v for k, v in vars(dataset).items() if isinstance(v, (bool, int, float, str))})
    items = getattr(dataset, "items", None)
    if items is not None:
        files = []
        for path, caption in items:
            stat = Path(path).stat()
            files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, caption])
        identity["files"] = files
    return identity


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over a module's parameter and buffer names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(dataset: object, encoder: nn.Module | None = None, **settings: object) -> str:
    """One hash of the dataset's identity, the encoder's weights (if any) and extra settings."""
    record = {"data": data_identity(dataset), "encoder": weights_hash(encoder) if encoder is not None else None,
              "settings": settings}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def load_cache(path: Path, key: str) -> dict | None:
    """The cache at `path` if it was computed for `key` (read as tensors and plain data only), else None."""
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):
        print(f"{path} is unreadable: computing it again")
        return None
    if not isinstance(cache, dict) or cache.get(FINGERPRINT_KEY) != key:
        print(f"the data, the encoder or the settings changed since {path} was cached: computing it again")
        return None
    return {k: v for k, v in cache.items() if k != FINGERPRINT_KEY}


def save_cache(path: Path, cache: dict, key: str) -> None:
    """Write the cache with its fingerprint atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save({**cache, FINGERPRINT_KEY: key}, tmp)
    tmp.replace(path)
