"""Prompt syntax: emphasis weights, 75-token chunks, weighted text encoding, PNG "parameters" text.

The emphasis syntax is the one the popular web UI made standard:
`(word)` multiplies attention by 1.1, `[word]` divides by 1.1, `(word:1.3)` sets 1.3, and nesting
multiplies; `\\(` and `\\)` are literal brackets. Prompts longer than one chunk are split into chunks
of `model_max_length - 2` tokens, each encoded on its own and concatenated along the sequence; the word BREAK
ends a chunk early (the rest of it is padding), so what follows starts a chunk of its own.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Protocol, Sequence

import torch

from .errors import NanoDiffusionError
from .prompt_schedule import ScheduledConditioning

EMPHASIS = 1.1
MAX_EMPHASIS = 100.0   # |weight| of a run after nesting: beyond it text embeddings overflow float32
MAX_PROMPT_CHARS = 20_000
WARNING_STEPS = 100   # a schedule read at 100 steps shows edits to 1 % and every option of alternations up to 100

_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*")


class Tokenizer(Protocol):
    model_max_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...


def check_prompt(text: str, what: str = "prompt") -> None:
    """A prompt must be text, at most MAX_PROMPT_CHARS long, and encodable as UTF-8 (no unpaired surrogates)."""
    if not isinstance(text, str):
        raise NanoDiffusionError(f"{what} must be text, not {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise NanoDiffusionError(f"{what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}: shorten it")
    check_text(text, what)


def check_text(text: str, what: str) -> None:
    """Text must encode as UTF-8: a lone surrogate ("\\ud800" in JSON, undecodable bytes in argv) cannot."""
    if text.isascii():   # O(1) in CPython: the common case, even for a 32 MB base64 image
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise NanoDiffusionError(f"{what} holds an unpaired surrogate ({text[error.start]!a}) at character "
                                 f"{error.start}: send valid UTF-8 text") from None


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs following the (word:1.3) / (word) / [word] syntax.

    Linear time: each bracket is a node whose factor is known when it closes (or at the end, when it never
    does); a run remembers the innermost open ( and [ nodes, and its weight is the product of factors up both
    chains, each chain's products computed once per node. Round and square brackets nest independently.
    """
    parent, factor = [-1], [1.0]          # node 0: the root, outside any bracket
    runs: list[tuple[str, int, int]] = []  # (text, innermost round node, innermost square node)
    open_nodes: dict[str, list[int]] = {"(": [0], "[": [0]}

    def push(kind: str) -> None:
        parent.append(open_nodes[kind][-1])
        factor.append(EMPHASIS if kind == "(" else 1 / EMPHASIS)   # unless closed with an explicit weight
        open_nodes[kind].append(len(parent) - 1)

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append((token[1:] or token, open_nodes["("][-1], open_nodes["["][-1]))
        elif token in ("(", "["):
            push(token)
        elif weight is not None and len(open_nodes["("]) > 1:
            factor[open_nodes["("].pop()] = emphasis_weight(weight)
        elif token == ")" and len(open_nodes["("]) > 1:
            open_nodes["("].pop()
        elif token == "]" and len(open_nodes["["]) > 1:
            open_nodes["["].pop()
        else:
            runs.append((token, open_nodes["("][-1], open_nodes["["][-1]))
    total = factor[:]
    for node in range(1, len(total)):      # parents come before their children
        total[node] *= total[parent[node]]
    merged: list[tuple[list[str], float]] = []
    for chunk, round_node, square_node in runs:
        weight = total[round_node] * total[square_node]
        if merged and merged[-1][1] == weight:
            merged[-1][0].append(chunk)
        else:
            check_emphasis(weight, chunk)
            merged.append(([chunk], weight))
    return [("".join(chunks), weight) for chunks, weight in merged] or [("", 1.0)]


def emphasis_weight(text: str) -> float:
    """The number of a `(word:1.3)` weight, refusing what is not a finite number."""
    try:
        weight = float(text)
    except ValueError:
        raise NanoDiffusionError(f"emphasis weight {text[:20]!r} is not a number: write (word:1.3)") from None
    check_emphasis(weight, text)
    return weight


def check_emphasis(weight: float, where: str) -> None:
    """Emphasis weights (nesting multiplies them) must be finite and within +-MAX_EMPHASIS."""
    if not abs(weight) <= MAX_EMPHASIS:
        raise NanoDiffusionError(f"emphasis weight {weight:g} (at {where[:20]!r}) is out of range: nested brackets "
                                 f"multiply; keep weights within +-{MAX_EMPHASIS:g}")


def weighted_chunks(tokenizer: Tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """Token ids of a prompt (no start/end tokens) with the emphasis weight of each token, split into chunks of at
    most model_max_length - 2 tokens; BREAK ends a chunk (a trailing BREAK adds no empty chunk)."""
    check_prompt(text)
    body = tokenizer.model_max_length - 2
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    for run, weight in parse_emphasis(text):
        for k, piece in enumerate(BREAK.split(run)):
            if k:
                chunks.append(([], []))
            for token in tokenizer.encode(piece):
                if len(chunks[-1][0]) == body:
                    chunks.append(([], []))
                chunks[-1][0].append(token)
                chunks[-1][1].append(weight)
    if len(chunks) > 1 and not chunks[-1][0]:
        chunks.pop()
    return chunks


def chunk_tokens(tokenizer: Tokenizer, chunks: list[tuple[list[int], list[float]]],
                 n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay chunks out as n_chunks rows of [bos, up to L-2 tokens, eos, pad...] with per-token weights (missing
    chunks are empty ones)."""
    rows, row_weights = [], []
    for c in range(n_chunks):
        part, part_w = chunks[c] if c < len(chunks) else ([], [])
        pad = tokenizer.model_max_length - 2 - len(part)
        rows.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        row_weights.append([1.0, *part_w, 1.0] + [1.0] * pad)
    return torch.tensor(rows), torch.tensor(row_weights)


def prompt_warnings(tokenizer: Tokenizer, text: str) -> list[str]:
    """What a user should hear about a prompt the model will still run on: empty, unknown words, split into chunks.
    Every text the prompt's edits, alternations and AND parts produce is checked (its schedule over WARNING_STEPS)."""
    if not text.strip():
        return ["empty prompt: the image is an unconditional sample"]
    messages = []
    texts = ScheduledConditioning.parse(text, WARNING_STEPS).values()
    plain = " ".join(BREAK.sub(" ", run) for t in texts for run, _ in parse_emphasis(t))   # (red:1.2): not words
    unknown = getattr(tokenizer, "unknown_words", lambda _: [])(plain)
    if unknown:
        messages.append(f"words this model does not know are ignored: {', '.join(unknown)}")
    body = tokenizer.model_max_length - 2
    cut = [chunks for chunks in (weighted_chunks(tokenizer, t) for t in texts)
           if any(len(ids) == body for ids, _ in chunks[:-1])]   # a full chunk before another: cut, not BREAK
    if cut:
        n_tokens, n_chunks = max((sum(len(ids) for ids, _ in chunks), len(chunks)) for chunks in cut)
        messages.append(f"prompt is {n_tokens} tokens, longer than the {body} the model reads at once: encoded in "
                        f"{n_chunks} chunks")
    return messages


def emphasised(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token states scaled by their emphasis weights, then rescaled to their original mean (the web UI's)."""
    scaled = z * weights.unsqueeze(-1).to(z)
    return scaled * (z.mean() / scaled.mean())


Encoder = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], torch.Tensor | None]]


@torch.no_grad()
def encode_prompts(text_encoder: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str],
                   clip_skip: int = 1) -> torch.Tensor:
    """Encode prompts to [B, chunks*L, D]; weights scale token embeddings, then the mean is restored."""
    return encode_weighted(lambda ids: ([text_encoder(ids[0], clip_skip=clip_skip)], None), [tokenizer], prompts)[0]


@torch.no_grad()
def encode_weighted(encode: Encoder, tokenizers: Sequence[Tokenizer], prompts: Sequence[str]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The web UI's prompt encoding for one or several text encoders: each prompt's chunks (weighted_chunks) laid
    out by every tokenizer (chunk_tokens), `encode(ids per tokenizer)` -> (states per encoder [chunks, L, D_i],
    pooled [chunks, P] or None); each encoder's states scaled by the emphasis weights with their mean restored,
    concatenated along the features and the chunks: ([B, chunks*L, sum D_i], the first chunk's pooled [B, P])."""
    chunked = [weighted_chunks(tokenizers[0], p) for p in prompts]
    n_chunks = max(len(chunks) for chunks in chunked)
    out, pooled = [], []
    for chunks in chunked:
        rows = [chunk_tokens(tokenizer, chunks, n_chunks) for tokenizer in tokenizers]
        states, pool = encode([ids for ids, _ in rows])
        weights = rows[0][1]
        if (weights != 1).any():
            states = [emphasised(z, weights) for z in states]
        z = torch.cat(states, dim=-1)
        out.append(z.reshape(1, -1, z.shape[-1]))
        pooled.append(None if pool is None else pool[:1])
    return torch.cat(out), None if pooled[0] is None else torch.cat(pooled)


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """The PNG "parameters" text as the popular web UI writes it: prompt, negative, then key: value (values with
    a comma, colon, quote or newline JSON-quoted, as the web UI does)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(str(value))}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def quote(value: str) -> str:
    """A settings value as written: plain when it cannot be misread, else a JSON string."""
    plain = value and value == value.strip() and not any(c in value for c in ',":\n')
    return value if plain else json.dumps(value, ensure_ascii=False)


_SETTING = re.compile(r'(\w[\w ]*): ("(?:[^"\\]|\\.)*"|[^,"]+)(?:, |$)')


def parse_settings(line: str) -> dict[str, str] | None:
    """The last line of a parameters text, "Key: value, Key: "quoted, value"", as a dict; None if it is not one."""
    settings: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _SETTING.match(line, position)
        if match is None:
            return None
        key, value = match.groups()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        settings[key] = value
        position = match.end()
    return settings or None


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of format_parameters: (prompt, negative prompt, settings)."""
    lines = text.strip().split("\n")
    settings = parse_settings(lines[-1]) if lines else None
    if settings is not None:
        lines.pop()
    negative = ""
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt: "):
            negative = "\n".join([line[len("Negative prompt: "):], *lines[i + 1:]])
            lines = lines[:i]
            break
    return "\n".join(lines), negative, settings or {}
