"""Test-only access to the reference libraries (never imported by the package).

k-diffusion's package __init__ imports torchvision, scikit-image and CLIP, none of which we install;
`k_sampling()` loads just `k_diffusion/sampling.py` and `utils.py` with a stub for the one
torchvision import utils.py makes.
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def k_sampling() -> types.ModuleType:
    """k_diffusion.sampling, loaded without the package __init__ (skips the test if absent)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (dev extra)")
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


def clip_tokenizer_dir() -> Path:
    """The real CLIP vocab.json + merges.txt from ../shared (skips the test if absent)."""
    if not (SHARED_TOKENIZER / "vocab.json").exists():
        pytest.skip("../shared/clip-tokenizer is not beside the checkout")
    return SHARED_TOKENIZER
