"""Test-only access to the reference libraries (never imported by the package).

k-diffusion's package __init__ imports torchvision, scikit-image and CLIP, none of which we install;
`k_sampling()` loads just `k_diffusion/sampling.py` and `utils.py` with a stub for the one
torchvision import utils.py makes.
"""

import atexit
import functools
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import pytest

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def missing_oracle(reason: str) -> None:
    """A reference library or file the dev extra installs is absent: skip locally, but fail in CI (CI=true),
    where every parity test must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: a missing test oracle is a failure; run `bash scripts/setup.sh dev`)")
    pytest.skip(reason)


def require(module: str) -> types.ModuleType:
    """Import a reference library (diffusers, transformers, peft, ...); missing_oracle if it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing_oracle(f"{module} is not installed (dev extra)")


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def k_sampling() -> types.ModuleType:
    """k_diffusion.sampling, loaded without the package __init__ (missing_oracle if absent)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        missing_oracle("k-diffusion is not installed (dev extra)")
    root = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    if "torchvision" not in sys.modules:
        try:
            import torchvision.transforms.functional  # noqa: F401
        except Exception:
            tv = types.ModuleType("torchvision")
            tv.transforms = types.ModuleType("torchvision.transforms")
            tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
            sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms,
                                "torchvision.transforms.functional": tv.transforms.functional})
    package.utils = _load("k_diffusion.utils", root / "utils.py")
    package.sampling = _load("k_diffusion.sampling", root / "sampling.py")
    return package.sampling


@functools.lru_cache(maxsize=None)
def _clip_tokenizer_folder() -> Path | None:
    """vocab.json + merges.txt (Hugging Face's format) written from OpenAI's own tokenizer code and vocabulary,
    both shipped by the clip-anytorch package (dev extra), into a temporary folder."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    reference = _load("clip_simple_tokenizer", root / "simple_tokenizer.py").SimpleTokenizer(
        str(root / "bpe_simple_vocab_16e6.txt.gz"))
    folder = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "vocab.json").write_text(json.dumps(reference.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def clip_tokenizer_dir() -> Path:
    """The real CLIP vocabulary as a vocab.json + merges.txt folder (from clip-anytorch, see above)."""
    folder = _clip_tokenizer_folder()
    if folder is None:
        missing_oracle("clip-anytorch is not installed: `pip install --no-deps clip-anytorch` (scripts/setup.sh dev)")
    return folder
