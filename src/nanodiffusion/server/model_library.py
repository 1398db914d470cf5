"""The checkpoints a server can switch between: the model it started with plus those in --models-dir.

One model is in memory at a time; another is loaded when a job asks for it (`options.sd_model_checkpoint` or a
request's `override_settings`), on the worker thread, between jobs. Names follow the popular web UI
(modules/sd_models.py): title "NAME [SHORTHASH]", model_name, and any of title / file name / model name / hashes
selects a checkpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..checkpoints import is_diffusers_folder
from ..errors import NanoDiffusionError, choice_error
from ..file_hashes import file_sha256

SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Checkpoint:
    """One selectable model: where it is, its name relative to the models folder, its hash once known."""

    path: Path | None
    name: str
    sha256: str | None = None
    shorthash: str | None = None

    @property
    def model_name(self) -> str:
        """The web UI's model_name: the relative name with folders joined by "_" and no extension."""
        stem = self.name.replace("/", "_").replace("\\", "_")
        return stem.rsplit(".", 1)[0] if stem.endswith(SUFFIXES) else stem

    @property
    def title(self) -> str:
        """"name [shorthash]" once hashed, else the name."""
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    def names(self) -> set[str]:
        """Every name that selects this checkpoint."""
        return {n for n in (self.title, self.name, self.model_name, self.shorthash, self.sha256) if n}

    def item(self) -> dict[str, Any]:
        """The web UI's /sd-models entry."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": str(self.path) if self.path else self.name, "config": None}


class ModelLibrary:
    """The loaded pipeline, the checkpoints on offer, and the switch between them (one in memory at a time)."""

    def __init__(self, pipeline: Any, path: str | Path | None = None, folder: str | Path | None = None,
                 loader: Callable[[Path], Any] | None = None, on_load: Callable[[Any], None] | None = None) -> None:
        self.pipeline = pipeline
        self.folder = Path(folder) if folder else None
        self.loader = loader
        self.on_load = on_load or (lambda pipeline: None)
        self.lock = threading.Lock()
        self.refining: tuple[Checkpoint, Any] | None = None   # the refiner loaded beside the model, if any
        path = Path(path) if path else None
        sha = file_sha256(path) if path is not None and path.is_file() else None
        sha = sha or (pipeline.model_hash if len(pipeline.model_hash) == 64 else None)
        self.current = Checkpoint(path, pipeline.name, sha, pipeline.model_hash[:10] or None)
        if self.folder is not None and not self.folder.is_dir():
            raise NanoDiffusionError(f"models folder {self.folder} does not exist: pass an existing --models-dir")
        self.checkpoints = self.scan()

    def scan(self) -> list[Checkpoint]:
        """The started model plus every .safetensors / .ckpt file and diffusers folder in the models folder."""
        found = [self.current]
        if self.folder is None:
            return found
        known = {c.path.absolute(): c for c in getattr(self, "checkpoints", []) if c.path}
        current = self.current.path.absolute() if self.current.path else None
        candidates = [p for p in sorted(self.folder.rglob("*"))
                      if (p.is_file() and p.suffix in SUFFIXES) or (p.is_dir() and is_diffusers_folder(p))]
        for path in candidates:
            if path.absolute() == current or any(parent in candidates for parent in path.parents):
                continue
            name = path.relative_to(self.folder).as_posix()
            found.append(known.get(path.absolute()) or Checkpoint(path, name))
        return found

    def refresh(self) -> None:
        """Rescan the models folder (hashes already computed are kept)."""
        self.checkpoints = self.scan()

    def find(self, name: str) -> Checkpoint:
        """The checkpoint any of its names selects; unknown -> an error listing the titles."""
        name = name.strip()
        for checkpoint in self.checkpoints:
            if name in checkpoint.names():
                return checkpoint
        raise choice_error("checkpoint", name, [c.title for c in self.checkpoints])

    def refiner(self, checkpoint: Checkpoint) -> Any:
        """The pipeline of a refiner checkpoint, kept beside the current model (loaded on first use; another
        refiner replaces it). The current model itself cannot refine its own images."""
        if checkpoint is self.current:
            raise NanoDiffusionError(f"refiner_checkpoint {checkpoint.title!r} is the model being used: name a "
                                     "refiner, e.g. the SDXL refiner, or leave refiner_checkpoint out")
        if self.refining is None or self.refining[0] is not checkpoint:
            if self.loader is None or checkpoint.path is None:
                raise NanoDiffusionError(f"checkpoint {checkpoint.title!r} cannot be loaded by this server")
            self.refining = None   # free the previous refiner first
            self.refining = (checkpoint, self.loader(checkpoint.path))
        return self.refining[1]

    def use(self, checkpoint: Checkpoint) -> Any:
        """The pipeline of `checkpoint`, loading it (and dropping the current one) if another is loaded."""
        if checkpoint is self.current:
            return self.pipeline
        if self.loader is None or checkpoint.path is None:
            raise NanoDiffusionError(f"checkpoint {checkpoint.title!r} cannot be loaded by this server")
        previous = self.current
        if previous.path is not None:   # can be loaded again: free its memory first
            self.pipeline = None
        try:
            pipeline = self.loader(checkpoint.path)
        except NanoDiffusionError:
            self.pipeline = self.pipeline or self.loader(previous.path)
            raise
        if checkpoint.path.is_file() and checkpoint.sha256 is None:
            checkpoint.sha256 = file_sha256(checkpoint.path)
        checkpoint.shorthash = (checkpoint.sha256 or pipeline.model_hash)[:10] or None
        self.pipeline, self.current = pipeline, checkpoint
        self.on_load(pipeline)
        return pipeline
