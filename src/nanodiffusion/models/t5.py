"""The T5 encoder (Raffel et al. 2020) in its v1.1 form, SD3's third text encoder, and its SentencePiece tokenizer.

A pre-norm transformer encoder with three departures from the original transformer (Raffel et al. 2020, sec. 2.1):
    RMSNorm without bias or mean subtraction ("T5LayerNorm", Zhang & Sennrich 2019),
    no absolute positions: a learned scalar bias per head and bucketed relative distance, added to the attention
    logits (computed by the first layer, shared by all), and no 1/sqrt(d) scaling of the logits,
    v1.1's gated-GELU feed-forward wo(GELU(wi_0 x) * wi_1 x) (Shazeer 2020).
Attribute names are transformers' T5EncoderModel's (encoder.block.N.layer.0.SelfAttention.q, shared.weight, ...), so
a `text_encoder_3/` state dict loads with no key map. The tokenizer reads the model folder's `tokenizer.json`
with the `tokenizers` library (the Unigram SentencePiece model, its normaliser and the `</s>` post-processor).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NanoDiffusionError, choice_error

# feed_forward_proj -> (gated, activation), as transformers' T5Config reads it ("gated-gelu" is tanh-approximate)
FEED_FORWARDS: dict[str, tuple[bool, Callable[[Tensor], Tensor]]] = {
    "relu": (False, F.relu),
    "gelu": (False, F.gelu),
    "gated-gelu": (True, lambda x: F.gelu(x, approximate="tanh")),
    "gated-silu": (True, F.silu),
}
T5_MAX_LENGTH = 256   # SD3's max_sequence_length for the T5 prompt


@dataclass
class T5Config:
    """transformers' T5Config fields the encoder uses (config.json keys); defaults are transformers' (t5-small)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_dict(cls, config: dict) -> T5Config:
        """Build from a config.json dict, ignoring keys the encoder does not use."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict:
        """The config.json dict."""
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the mean over the last dimension taken in float32 (Zhang & Sennrich 2019);
    the result in a half-precision weight's dtype, else in the input's (bfloat16 compute keeps float32 weights)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            return self.weight * x.to(self.weight.dtype)
        return (self.weight * x).to(dtype)


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket of each key-minus-query distance (Raffel et al. 2020, sec. 2.1): half the buckets per direction, exact
    below num_buckets / 4, then logarithmic up to max_distance, beyond which distances share the last bucket."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bucket.clamp(max=half - 1))


class T5Attention(nn.Module):
    """Multi-head self-attention softmax(Q K^T + B) V with no 1/sqrt(d) scaling; B is the relative position bias."""

    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.config = c
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.relative_attention_bias = (nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
                                        if has_relative_attention_bias else None)

    def position_bias(self, n: int, device: torch.device) -> Tensor:
        """B [1, heads, n, n]: the learned bias of each head for the bucket of (key - query) distance."""
        positions = torch.arange(n, device=device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                           self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.config.num_heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    """x + Attn(RMSNorm(x))."""

    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_attention_bias)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseActDense(nn.Module):
    """The feed-forward: wo(act(wi_0 x) * wi_1 x) when gated (T5 v1.1, Shazeer 2020), else wo(act(wi x))."""

    def __init__(self, c: T5Config):
        super().__init__()
        if c.feed_forward_proj not in FEED_FORWARDS:
            raise choice_error("T5 feed_forward_proj", c.feed_forward_proj, list(FEED_FORWARDS))
        self.gated, self.act = FEED_FORWARDS[c.feed_forward_proj]
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5LayerFF(nn.Module):
    """x + FF(RMSNorm(x))."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(c)
        self.layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """Self-attention sublayer then feed-forward sublayer, each pre-norm and residual."""

    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias), T5LayerFF(c)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    """The encoder blocks (only the first owns the relative position bias) and the final RMSNorm."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, has_relative_attention_bias=i == 0) for i in range(c.num_layers))
        self.final_layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1], x.device)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """Token ids [B, L] -> last hidden states [B, L, d_model] (no attention mask: SD3 encodes the padding too)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder(self.shared(input_ids))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "encoder.embed_tokens.weight", None)   # transformers' tied copy of shared.weight
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class T5Tokenizer:
    """T5's SentencePiece (Unigram) tokenizer from a model folder's tokenizer.json, run by the `tokenizers` library:
    text -> pieces -> ids, `</s>` appended, truncated to model_max_length (keeping `</s>`), padded with `<pad>`."""

    def __init__(self, tokenizer_json: str | Path, model_max_length: int = T5_MAX_LENGTH, pad_token: str = "<pad>"):
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise NanoDiffusionError("the T5 tokenizer needs the tokenizers package: pip install tokenizers") from error
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:   # the library raises its own Exception type for unreadable files
            raise NanoDiffusionError(f"cannot read the T5 tokenizer {tokenizer_json}: {error}") from error
        self.pad_token_id = self.tokenizer.token_to_id(pad_token)
        if self.pad_token_id is None:
            raise NanoDiffusionError(f"the T5 tokenizer {tokenizer_json} has no {pad_token} token")
        self.model_max_length = model_max_length
        self.tokenizer.enable_truncation(model_max_length)
        self.tokenizer.enable_padding(length=model_max_length, pad_id=self.pad_token_id, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | Path, model_max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
        """From a tokenizer folder (`tokenizer_3/` of a diffusers SD3 model) or a model folder holding one."""
        folder = Path(folder)
        if (folder / "tokenizer_3").is_dir():
            folder = folder / "tokenizer_3"
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise NanoDiffusionError(f"no T5 tokenizer in {folder}: it needs tokenizer.json (the one published with "
                                     f"the model; a spiece.model alone is not read)")
        config_file = folder / "special_tokens_map.json"
        pad = json.loads(config_file.read_text(encoding="utf-8")).get("pad_token") if config_file.is_file() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        return cls(path, model_max_length, pad or "<pad>")

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids [B, model_max_length]: the text's pieces (truncated), `</s>`, padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=torch.long)
