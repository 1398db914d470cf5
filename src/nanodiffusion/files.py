"""Writing a file or folder atomically: build it as a temporary sibling, rename it into place only on success."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import NanoDiffusionError


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def same_location(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links, or the same inode)."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


@contextmanager
def atomic_output(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; on success it replaces `destination` (a previous file or
    folder there is removed only then), on failure it is deleted and `destination` is left as it was."""
    destination = Path(destination)
    if destination.exists() and not (destination.is_dir() or destination.is_file()):
        raise NanoDiffusionError(f"{destination} exists and is neither a file nor a folder: pass another output")
    tmp = destination.with_name(f".tmp-{destination.name}")
    old = destination.with_name(f".old-{destination.name}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove(tmp)
    try:
        yield tmp
        moved = destination.exists()
        if moved:
            remove(old)
            os.replace(destination, old)
        try:
            os.replace(tmp, destination)
        except OSError:
            if moved:
                os.replace(old, destination)
            raise
    finally:
        remove(tmp)
    remove(old)
