"""The built-in word tokenizer and `load_tokenizer`'s choice of tokenizer."""

import json
import shutil

import pytest
import torch

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models import tokenizers
from nanodiffusion.models.clip import CLIPTokenizer, bundled_bpe_path
from nanodiffusion.models.tokenizers import load_tokenizer
from nanodiffusion.models.word_tokenizer import SPECIALS, WordTokenizer
from oracles import clip_tokenizer_dir, missing_oracle

CAPTIONS = ["a red circle above a blue square", "Two green triangles, left of a RED star.", "3 small squares"]


@pytest.fixture
def words() -> WordTokenizer:
    return WordTokenizer.build(CAPTIONS, model_max_length=8)


def test_build_lowercases_splits_and_sorts(words):
    vocab = words.tokens[len(SPECIALS):]
    assert vocab == sorted(vocab) and len(vocab) == len(set(vocab))
    assert {"red", "circle", "triangles", "star", "3"} <= set(vocab) and "RED" not in vocab and "star." not in vocab
    assert tuple(words.tokens[:4]) == SPECIALS and len(words) == len(words.tokens)


def test_encode_and_unknown_words(words):
    ids = words.encode("A RED circle, above... a purple hexagon!")
    assert [words.tokens[i] for i in ids] == ["a", "red", "circle", "above", "a", "<unk>", "<unk>"]
    assert words.unknown_words("purple hexagon, purple circle") == ["purple", "hexagon"]
    assert words.unknown_words("a red circle") == []


def test_call_adds_specials_pads_and_truncates(words):
    ids = words(["red star", "a red circle above a blue square left of"])
    bos, eos, pad = words.bos_token_id, words.eos_token_id, words.pad_token_id
    assert ids.dtype == torch.long and ids.shape == (2, 8) and len({bos, eos, pad, words.unk_token_id}) == 4
    assert ids[0].tolist() == [bos, *words.encode("red star"), eos] + [pad] * 4
    assert ids[1].tolist() == [bos, *words.encode("a red circle above a blue"), eos]
    assert torch.equal(words("red star"), ids[:1])


def test_save_load_round_trip(words, tmp_path):
    words.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "WordTokenizer"
    loaded = WordTokenizer.load(tmp_path)
    assert loaded.tokens == words.tokens and loaded.model_max_length == 8
    assert torch.equal(loaded(CAPTIONS), words(CAPTIONS))


def test_bad_word_vocabulary_raises(tmp_path):
    with pytest.raises(NanoDiffusionError, match="must start with"):
        WordTokenizer(["red", "blue"])
    with pytest.raises(NanoDiffusionError, match="vocab.json"):
        WordTokenizer.load(tmp_path)


def test_load_tokenizer_picks_the_word_tokenizer(words, tmp_path):
    words.save(tmp_path / "tokenizer")
    for folder in (tmp_path / "tokenizer", tmp_path):  # the tokenizer folder or the model folder above it
        loaded = load_tokenizer(folder)
        assert isinstance(loaded, WordTokenizer) and loaded.tokens == words.tokens


def test_load_tokenizer_reads_clip_folders_and_the_bundled_vocab():
    from_folder = load_tokenizer(clip_tokenizer_dir())
    assert isinstance(from_folder, CLIPTokenizer) and from_folder.pad_token_id == from_folder.eos_token_id
    assert load_tokenizer(clip_tokenizer_dir(), pad_with="!").pad_token_id == 0
    if bundled_bpe_path() is None:
        missing_oracle("clip-anytorch is not installed")
    bundled = load_tokenizer(None)
    assert isinstance(bundled, CLIPTokenizer) and bundled.vocab == from_folder.vocab
    assert load_tokenizer(bundled_bpe_path(), pad_with="!").pad_token_id == 0


def test_missing_vocabulary_says_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(NanoDiffusionError, match="does not exist.*--tokenizer.*clip-anytorch"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(NanoDiffusionError, match=f"{tmp_path}.*--tokenizer.*clip-anytorch"):
        load_tokenizer(tmp_path)
    monkeypatch.setattr(tokenizers, "bundled_bpe_path", lambda: None)
    with pytest.raises(NanoDiffusionError, match="clip-anytorch is not installed.*--tokenizer"):
        load_tokenizer(None)


def test_corrupt_tokenizer_files_raise_clear_errors(tmp_path):
    shutil.copy(clip_tokenizer_dir() / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(NanoDiffusionError, match="cannot read the tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.gz").write_bytes(b"not gzip")
    with pytest.raises(NanoDiffusionError, match="cannot read the tokenizer"):
        load_tokenizer(tmp_path / "vocab.gz")
