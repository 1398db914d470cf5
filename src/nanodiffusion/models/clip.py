"""CLIP's text side: the byte-level BPE tokenizer and the causal text transformer (Radford et al. 2021).

The tokenizer gives the same ids as OpenAI's CLIP and transformers' CLIPTokenizer; the text model
uses transformers' attribute names, so a `text_encoder/` state dict loads with no key map.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NanoDiffusionError, choice_error

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # the merges OpenAI's vocabulary uses: 49408 ids = 2 * 256 bytes + merges + 2 specials
PRE_TOKENS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
MISSING_VOCAB = ("pass --tokenizer PATH (a folder with vocab.json + merges.txt, such as a diffusers model's "
                 "tokenizer/ folder) or run `pip install --no-deps clip-anytorch`")


# ---------------------------------------------------------------------------------------------------
# Tokenizer


class FixedLengthTokenizer:
    """Shared batching: each text becomes [bos, ids..., eos, pad...] cut or padded to model_max_length."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    model_max_length: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [B, model_max_length]: start token, text (truncated), end token, padding."""
        texts = [texts] if isinstance(texts, str) else texts
        body = self.model_max_length - 2
        rows = []
        for text in texts:
            ids = self.encode(text)[:body]
            rows.append([self.bos_token_id, *ids, self.eos_token_id] + [self.pad_token_id] * (body - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.model_max_length)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable bytes map to themselves."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text: str) -> str:
    """transformers' CLIP normalisation: Unicode NFC, collapse whitespace, lowercase.

    OpenAI's original also runs ftfy and HTML unescaping; transformers (and so diffusers) does not,
    and identical images to diffusers need identical ids, so we follow transformers.
    """
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


def vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary order: the 256 byte characters, the same with </w>, one token per merge, specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def bundled_bpe_path() -> Path | None:
    """The vocabulary the `clip-anytorch` package ships, found without importing the package."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def _parse_merges(lines: list[str]) -> list[tuple[str, str]]:
    """merges.txt lines ("a b") to pairs, skipping the "#version" header and blank lines."""
    return [tuple(line.split()) for line in lines if line and not line.startswith("#version")]


def _special_token(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer(FixedLengthTokenizer):
    """Byte-level BPE with end-of-word marks (Sennrich et al. 2016; Radford et al. 2019, 2021)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 pad_token: str = EOS, model_max_length: int = 77):
        if pad_token not in vocab:
            raise NanoDiffusionError(f"pad token {pad_token!r} is not in the CLIP vocabulary: use {EOS!r} or '!'")
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_chars = bytes_to_unicode()
        self.bos_token_id, self.eos_token_id = vocab[BOS], vocab[EOS]
        self.pad_token, self.pad_token_id = pad_token, vocab[pad_token]
        self.model_max_length = model_max_length
        self.cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    @classmethod
    def from_folder(cls, folder: str | Path, pad_token: str | None = None) -> CLIPTokenizer:
        """Load a tokenizer folder: vocab.json + merges.txt, or the tokenizer.json transformers 5 writes."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            merges = _parse_merges((folder / "merges.txt").read_text(encoding="utf-8").split("\n"))
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
            vocab = model.get("vocab")
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges", [])]
            if not isinstance(vocab, dict) or not merges:
                raise NanoDiffusionError(f"{folder / 'tokenizer.json'} holds no BPE vocabulary: {MISSING_VOCAB}")
        else:
            raise NanoDiffusionError(f"no vocab.json + merges.txt or tokenizer.json in {folder}: {MISSING_VOCAB}")
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        length = settings.get("model_max_length")
        return cls(vocab, merges, pad_token=pad_token or _special_token(settings.get("pad_token")) or EOS,
                   model_max_length=length if isinstance(length, int) and 2 < length <= 4096 else 77)

    @classmethod
    def from_bpe_gz(cls, path: str | Path, pad_token: str | None = None) -> CLIPTokenizer:
        """Load OpenAI's gzipped merge list (bpe_simple_vocab_16e6.txt.gz) and derive the vocabulary."""
        lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
        return cls(vocab_from_merges(merges), merges, pad_token=pad_token or EOS)

    def bpe(self, word: str) -> list[str]:
        """Merge the adjacent pair with the lowest merge rank until no pair is in the table (cached)."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            first, second = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start/end tokens and without truncation."""
        ids = []
        for piece in PRE_TOKENS.findall(clean_text(text)):
            word = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[token] for token in self.bpe(word)]
        return ids


# ---------------------------------------------------------------------------------------------------
# Text model


@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields (config.json keys); defaults are transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: dict) -> CLIPTextConfig:
        """Build from a config.json dict, ignoring keys this model does not use."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict:
        """The config.json dict."""
        return asdict(self)


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,
}


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "position_ids", None)  # a buffer older checkpoints saved; we use arange
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention: softmax(QK^T / sqrt(d) + causal mask) V."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    """Position-wise feed-forward: fc2(act(fc1(x)))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise choice_error("CLIP hidden_act", config.hidden_act, list(ACTIVATIONS))
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of transformer blocks."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, n_layers: int) -> torch.Tensor:
        for layer in self.layers[:n_layers]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings -> causal transformer -> final LayerNorm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP's text encoder; its hidden states are Stable Diffusion's cross-attention context."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Hidden states [B, T, D]: clip_skip=1 is the last layer, 2 the penultimate, each after the final LN."""
        config, model = self.config, self.text_model
        self.check(input_ids, clip_skip)
        x = model.embeddings(input_ids)
        x = model.encoder(x, config.num_hidden_layers - clip_skip + 1)
        return model.final_layer_norm(x)

    def check(self, input_ids: torch.Tensor, clip_skip: int = 1) -> None:
        """One-line errors for a clip skip, a length or token ids this encoder cannot take."""
        config = self.config
        if not 1 <= clip_skip <= config.num_hidden_layers:
            raise NanoDiffusionError(f"clip skip {clip_skip} is out of range: use 1 to {config.num_hidden_layers}")
        if input_ids.shape[-1] > config.max_position_embeddings:
            raise NanoDiffusionError(f"{input_ids.shape[-1]} tokens exceed the text encoder's "
                                     f"{config.max_position_embeddings} positions: split the prompt into chunks")
        if input_ids.numel() and int(input_ids.max()) >= config.vocab_size:
            raise NanoDiffusionError(f"token id {int(input_ids.max())} is outside the text encoder's vocabulary of "
                                     f"{config.vocab_size}: the tokenizer does not match the model")

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output [B, T, D], the embeddings first, none through the final LN (transformers'
        output_hidden_states): [-2] is the penultimate layer SDXL and SD3 read."""
        self.check(input_ids)
        states = [self.text_model.embeddings(input_ids)]
        for layer in self.text_model.encoder.layers:
            states.append(layer(states[-1]))
        return states

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled output [B, D]: the clip_skip=1 hidden state at each sequence's end token."""
        if self.config.eos_token_id == 2:  # legacy configs: the end token has the largest id
            positions = input_ids.argmax(dim=-1)
        else:
            positions = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return last_hidden_state[torch.arange(len(input_ids), device=input_ids.device), positions]


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text encoder with its projection into the joint image-text space (transformers' class of the same
    name): SDXL's second encoder, OpenCLIP ViT-bigG, whose projected pooled output conditions the UNet (§2.1)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def text_embeds(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The projected pooled output [B, projection_dim] from the last layer's (unnormed) output."""
        return self.text_projection(self.pool(self.text_model.final_layer_norm(last_hidden_state), input_ids))
