"""The built-in model's tokenizer: one id per known word, with the same interface as CLIPTokenizer.

The built-in model only ever reads captions from a small, fixed vocabulary, so a word list is the
whole tokenizer. Words it never saw map to <unk>; `unknown_words` lets callers warn about them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from ..errors import NanoDiffusionError
from .clip import FixedLengthTokenizer

SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")
WORDS = re.compile(r"[^\W\d_]+|\d+")  # runs of letters (or of digits); everything else separates words


def split_words(text: str) -> list[str]:
    """Lowercase and split into words."""
    return WORDS.findall(text.lower())


class WordTokenizer(FixedLengthTokenizer):
    """Word-level tokenizer: ids are positions in a word list that starts with the special tokens."""

    def __init__(self, tokens: list[str], model_max_length: int = 77):
        if tuple(tokens[:len(SPECIALS)]) != SPECIALS:
            raise NanoDiffusionError(f"word vocabulary must start with {', '.join(SPECIALS)}: rebuild the tokenizer")
        self.tokens = tokens
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = range(len(SPECIALS))
        self.model_max_length = model_max_length

    @classmethod
    def build(cls, texts: Iterable[str], model_max_length: int = 77) -> WordTokenizer:
        """A vocabulary of every word in the given words or captions, sorted."""
        words = {word for text in texts for word in split_words(text)} - set(SPECIALS)
        return cls([*SPECIALS, *sorted(words)], model_max_length)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json (the token list) and tokenizer_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.tokens, indent=0), encoding="utf-8")
        config = {"tokenizer_class": "WordTokenizer", "model_max_length": self.model_max_length}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> WordTokenizer:
        """Read a folder written by `save`."""
        folder = Path(folder)
        if not (folder / "vocab.json").is_file():
            raise NanoDiffusionError(f"no vocab.json in word tokenizer folder {folder}: save the tokenizer there")
        tokens = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if not isinstance(tokens, list):
            raise NanoDiffusionError(f"{folder / 'vocab.json'} is not a word list: rebuild the tokenizer")
        return cls(tokens, config.get("model_max_length", 77))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Word ids of a text (unknown words -> <unk>), without start/end tokens and without truncation."""
        return [self.ids.get(word, self.unk_token_id) for word in split_words(text)]

    def unknown_words(self, text: str) -> list[str]:
        """The words of a text that are not in the vocabulary, each once, in order."""
        return list(dict.fromkeys(word for word in split_words(text) if word not in self.ids))
