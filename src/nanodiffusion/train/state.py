"""Training state on disk as safetensors + JSON only, so resuming a run folder never unpickles anything.

A checkpoint folder holds `model.safetensors` (the trained module), `training.safetensors` + `training.json`
(optimizer, EMA, step counter, gradient scaler: tensors in the first, everything else in the second with
{"$tensor": key} where a tensor was) and `rng-RANK.json` (each process's Python, NumPy and torch generators).
A damaged or tampered file is refused with one line; a missing or unreadable RNG file is a warning.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import NanoDiffusionError

MODEL_FILE, TENSORS_FILE, STATE_FILE = "model.safetensors", "training.safetensors", "training.json"


class Stateful(Protocol):
    """Anything with state_dict() / load_state_dict() (optimizer, EMA, step counter, gradient scaler)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def encode(value: object, tensors: dict[str, torch.Tensor], path: str = "") -> object:
    """Nested dicts / lists of tensors and plain values -> JSON data; tensors are moved into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"$tensor": path}
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: encode(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {"$items": [[key, encode(item, tensors, f"{path}.{i}")] for i, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [encode(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a training checkpoint")


def decode(value: object, tensors: dict[str, torch.Tensor]) -> object:
    """The inverse of `encode`: JSON data with tensor references -> nested dicts / lists of tensors and values."""
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        if set(value) == {"$items"}:
            return {key: decode(item, tensors) for key, item in value["$items"]}
        return {key: decode(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item, tensors) for item in value]
    return value


def save_training_state(folder: Path, model: torch.nn.Module, objects: dict[str, Stateful], rank: int) -> None:
    """Write the model and each object's state_dict (process 0 only); every process writes its RNG state."""
    folder = Path(folder)
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder / MODEL_FILE)
        tensors: dict[str, torch.Tensor] = {}
        plain = encode({name: obj.state_dict() for name, obj in objects.items()}, tensors)
        save_file(tensors, folder / TENSORS_FILE)
        (folder / STATE_FILE).write_text(json.dumps(plain))
    (folder / f"rng-{rank}.json").write_text(json.dumps(rng_state()))


def load_training_state(folder: Path, model: torch.nn.Module, objects: dict[str, Stateful], rank: int) -> None:
    """Load the model and every object in place, then this process's RNG; a damaged or foreign file is refused."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".pkl", ".bin", ".pt"))
        detail = f"it holds pickle files ({', '.join(found)}), which can run code and are not read" if found \
            else f"{STATE_FILE} is missing"
        raise NanoDiffusionError(f"cannot resume from {folder}: {detail}; delete that folder (or pass another "
                                 "--output) to train from the previous checkpoint or from scratch")
    try:
        model.load_state_dict(load_file(folder / MODEL_FILE))
        state = decode(json.loads((folder / STATE_FILE).read_text()), load_file(folder / TENSORS_FILE))
        for name, obj in objects.items():
            obj.load_state_dict(state[name])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NanoDiffusionError(f"cannot resume from {folder}: its files are damaged or were not written by "
                                 f"nanodiffusion ({reason[:200]}); delete that folder to resume from an earlier "
                                 "checkpoint") from None
    restore_rng_state(folder / f"rng-{rank}.json")


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU (and CUDA) generator states as JSON data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(path: Path) -> None:
    """Restore this process's generators from its rng-RANK.json; if unreadable, warn (the run goes on, not repeatably)."""
    try:
        state = json.loads(path.read_text())
        version, internal, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError) as error:
        warnings.warn(f"could not restore the random state from {path} ({error}): the resumed run continues, "
                      "but will not repeat an uninterrupted run exactly", stacklevel=2)
