"""Write a model as a diffusers-style sub-folder: config.json + a safetensors file, atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def save_module(module: nn.Module, config: dict, folder: Path, filename: str,
                dtype: torch.dtype = torch.float32) -> Path:
    """Save module weights (cast to dtype) and its config.json; a temporary folder is renamed into place."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, tmp / filename, metadata={"format": "pt"})
    os.chmod(tmp / filename, 0o644)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
