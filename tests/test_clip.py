"""CLIP tokenizer and text model: same ids as transformers / OpenAI, same hidden states as transformers."""

import importlib.util
import shutil

import pytest
import torch

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.models.clip import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, bundled_bpe_path,
                                       clean_text)
from oracles import clip_tokenizer_dir, missing_oracle, require

transformers = require("transformers")

# Text that every CLIP normalisation leaves alone except for NFC, whitespace and case.
PLAIN = [
    "a photo of an astronaut riding a horse on mars",
    "A Red Circle ABOVE a blue square, highly detailed; 8k!!",
    "",
    "   ",
    "it's I'm we'll they'd you've she's don't",
    "1234567.89 3d 1st 2nd 10,000",
    "😀🎉 emoji 👍🏽 ❤️",
    "日本語のテキスト 中文 한국어 Ελληνικά русский",
    "café naïve résumé cafe\u0301",
    "MiXeD CaSe WoRdS",
    "Ünïcödé ßtraße İstanbul",
    "tabs\tand\nnewlines   and    spaces",
    "<|startoftext|> inner specials <|endoftext|>",
    "$%^&*()_+-=[]{};:'\",.<>/?\\|`~ (masterpiece:1.2) [bad]",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a very long prompt " * 40,
]
# Text that OpenAI's ftfy / HTML unescaping would change; transformers (our reference) only applies NFC.
FIXED_BY_FTFY = [
    "salt &amp; pepper &lt;3 &quot;quoted&quot; &#39;x&#39;",
    "it’s “curly” quotes",
    "ＦＵＬＬ width ｔｅｘｔ",
    "ﬁne ﬂow ligatures",
    "mojibake: cafÃ©",
    "ǅ digraph ligature",
]


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(clip_tokenizer_dir())


@pytest.fixture(scope="module")
def theirs():
    return transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))


@pytest.fixture(scope="module")
def openai():
    """OpenAI's reference tokenizer as clip-anytorch ships it (loaded without the package __init__)."""
    path = bundled_bpe_path()
    if path is None:
        missing_oracle("clip-anytorch is not installed")
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path.parent / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(path))


def reference_batch(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("text", PLAIN)
def test_encode_matches_transformers_and_openai(ours, theirs, openai, text):
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False).input_ids
    assert ids == openai.encode(text)


@pytest.mark.parametrize("text", FIXED_BY_FTFY)
def test_normalisation_follows_transformers_not_ftfy(ours, theirs, openai, text):
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False).input_ids
    assert ids == theirs(clean_text(text), add_special_tokens=False).input_ids
    assert ids != openai.encode(text)  # the case really exercises the difference


def test_batch_pads_with_end_token_like_transformers(ours, theirs):
    ids = ours(PLAIN)
    assert ids.dtype == torch.long and ids.shape == (len(PLAIN), 77)
    assert torch.equal(ids, reference_batch(theirs, PLAIN))
    assert ours.pad_token_id == ours.eos_token_id == 49407 and ours.bos_token_id == 49406
    assert ids[-1, -1] == ours.eos_token_id and ids[-1, 0] == ours.bos_token_id  # truncated, still ends with eos


def test_sd2_folder_pads_with_exclamation_mark(tmp_path, theirs):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_tokenizer_dir() / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(
        '{"pad_token": {"content": "!", "lstrip": false}, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}')
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == 0 and ours.model_max_length == 77
    reference = transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
    texts = ["a cat", "", "a very long prompt " * 40]
    ids = ours(texts)
    assert torch.equal(ids, reference_batch(reference, texts))
    assert ids[0, 3] == ours.eos_token_id and (ids[0, 4:] == 0).all()
    assert torch.equal(CLIPTokenizer.from_folder(clip_tokenizer_dir(), pad_token="!")(texts), ids)


def test_openai_gz_gives_the_same_tokenizer(ours, openai):
    path = bundled_bpe_path()
    from_gz = CLIPTokenizer.from_bpe_gz(path)
    assert from_gz.vocab == ours.vocab and from_gz.ranks == ours.ranks
    assert torch.equal(from_gz(PLAIN + FIXED_BY_FTFY), ours(PLAIN + FIXED_BY_FTFY))


def test_bpe_results_are_cached(ours):
    ours.encode("zanzibarian")
    assert "zanzibarian" in ours.cache
    ours.cache["zanzibarian"] = ["a</w>"]
    assert ours.encode("zanzibarian") == [ours.vocab["a</w>"]]
    del ours.cache["zanzibarian"]


def test_bad_folder_and_pad_token_raise_clear_errors(tmp_path):
    with pytest.raises(NanoDiffusionError, match="vocab.json.*--tokenizer.*clip-anytorch"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(NanoDiffusionError, match="pad token"):
        CLIPTokenizer.from_folder(clip_tokenizer_dir(), pad_token="<nope>")


# ---------------------------------------------------------------------------------------------------
# Text model

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=98)


def twin_models(**overrides):
    """A random transformers CLIPTextModel and ours holding the same weights."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**{**TINY, **overrides})
    theirs = transformers.CLIPTextModel(config).eval()
    ours = CLIPTextModel(CLIPTextConfig.from_dict(config.to_dict())).eval()
    ours.load_state_dict({"text_model." + k: v for k, v in theirs.state_dict().items()})
    return ours, theirs


def token_batch(eos: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 16), generator=generator)
    ids[0, 5], ids[1, 11] = eos, eos
    return ids


def test_state_dict_keys_match_transformers_checkpoints():
    ours, theirs = twin_models()
    assert set(ours.state_dict()) == {"text_model." + k for k in theirs.state_dict()}
    state = ours.state_dict()
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # saved by older transformers
    ours.load_state_dict(state)


def test_config_from_dict_ignores_unknown_keys():
    config = CLIPTextConfig.from_dict({"hidden_size": 768, "num_hidden_layers": 12, "architectures": ["x"],
                                       "hidden_act": "gelu", "torch_dtype": "float32"})
    assert config.hidden_size == 768 and config.hidden_act == "gelu" and config.to_dict()["vocab_size"] == 49408


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hidden_states_match_transformers(act):
    ours, theirs = twin_models(hidden_act=act)
    ids = token_batch(eos=98)
    with torch.no_grad():
        reference = theirs(ids, output_hidden_states=True)
        last = ours(ids)
        assert (last - reference.last_hidden_state).abs().max() <= 1e-4
        for skip in (2, 3):
            expected = theirs.final_layer_norm(reference.hidden_states[-skip])
            assert (ours(ids, clip_skip=skip) - expected).abs().max() <= 1e-4
        assert (ours.pool(last, ids) - reference.pooler_output).abs().max() <= 1e-4
    assert (ours(ids, clip_skip=2) - last).abs().max() > 1e-2  # skipping a layer changes the output


def test_pooled_output_with_legacy_eos_id_matches_transformers():
    ours, theirs = twin_models(eos_token_id=2)
    ids = token_batch(eos=98)
    with torch.no_grad():
        assert (ours.pool(ours(ids), ids) - theirs(ids).pooler_output).abs().max() <= 1e-4


def test_text_model_rejects_bad_inputs_clearly():
    ours, _ = twin_models()
    with pytest.raises(NanoDiffusionError, match="clip skip"):
        ours(token_batch(98), clip_skip=4)
    with pytest.raises(NanoDiffusionError, match="vocabulary"):
        ours(torch.full((1, 4), 99))
    with pytest.raises(NanoDiffusionError, match="positions"):
        ours(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(NanoDiffusionError, match="hidden_act"):
        CLIPTextModel(CLIPTextConfig(**{**TINY, "hidden_act": "swish"}))


def test_folder_saved_by_transformers_5_loads(ours, theirs, tmp_path):
    """transformers 5 writes only tokenizer.json (+ config): the same vocabulary and merges come back."""
    theirs.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink(missing_ok=True)
    (tmp_path / "merges.txt").unlink(missing_ok=True)
    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert loaded.model_max_length == 77
    assert torch.equal(loaded(PLAIN), ours(PLAIN))
