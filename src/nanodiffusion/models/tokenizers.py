"""Pick and load the right tokenizer for a folder: the built-in word tokenizer or CLIP's BPE."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NanoDiffusionError
from .clip import MISSING_VOCAB, CLIPTokenizer, bundled_bpe_path
from .word_tokenizer import WordTokenizer


def load_tokenizer(folder: str | Path | None = None, pad_with: str | None = None) -> CLIPTokenizer | WordTokenizer:
    """Load the tokenizer in `folder` (None: the CLIP vocabulary clip-anytorch installs).

    `folder` may be a tokenizer folder, a diffusers model folder holding `tokenizer/`, or OpenAI's
    `bpe_simple_vocab_16e6.txt.gz`. `pad_with` overrides CLIP's pad token: "<|endoftext|>" (SD 1.x) or "!" (SD 2.x).
    """
    if folder is None:
        bundled = bundled_bpe_path()
        if bundled is None:
            raise NanoDiffusionError(
                f"no CLIP tokenizer vocabulary found (clip-anytorch is not installed): {MISSING_VOCAB}")
        return CLIPTokenizer.from_bpe_gz(bundled, pad_token=pad_with)
    folder = Path(folder)
    if not folder.exists():
        raise NanoDiffusionError(f"tokenizer path {folder} does not exist: {MISSING_VOCAB}")
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    try:
        if folder.is_file():
            return CLIPTokenizer.from_bpe_gz(folder, pad_token=pad_with)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if config.get("tokenizer_class") == WordTokenizer.__name__:
            return WordTokenizer.load(folder)
        return CLIPTokenizer.from_folder(folder, pad_token=pad_with)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NanoDiffusionError(f"cannot read the tokenizer in {folder} ({error}): {MISSING_VOCAB}") from error
