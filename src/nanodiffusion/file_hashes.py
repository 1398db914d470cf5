"""The sha256 of model files, remembered between runs, as the web UI remembers them in its cache.json.

The "Model hash" in every image's parameters is the first 10 hex digits of the checkpoint's sha256; reading SD 1.5's
3.4 GB UNet to hash it takes about 2 s, which every process that loads the model would pay again. The digest is kept
in $XDG_CACHE_HOME/nanodiffusion/hashes.json (~/.cache without it) under the file's absolute path, with its size and
modification time: a file that changed is hashed again. A cache that cannot be read or written is only slower.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_path() -> Path:
    """Where the digests are remembered."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "nanodiffusion" / "hashes.json"


def read_cache(path: Path) -> dict:
    """The remembered digests ({} when there is no readable cache)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def write_cache(path: Path, cache: dict) -> None:
    """Replace the cache file in one step (a reader never sees half of it); failing to write is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".hashes-", delete=False) as f:
            json.dump(cache, f)
        os.replace(f.name, path)
    except OSError:
        return


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (64 hex digits), from the cache when its size and modification time are unchanged."""
    path = Path(path).resolve()
    status = path.stat()
    stamp = [status.st_size, status.st_mtime_ns]
    cache_file = cache_path()
    cache = read_cache(cache_file)
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and SHA256.fullmatch(str(entry.get("sha256"))):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    write_cache(cache_file, cache)
    return digest.hexdigest()
