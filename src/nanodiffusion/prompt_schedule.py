"""Prompts that change during sampling: prompt editing, alternation and composable AND, the popular web UI's syntax.

- `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds `to` after step `when`; `[from::when]`
  removes `from` after it. `when` with a decimal point is a fraction of the steps (`0.25`, `1.0`), without one a
  step number (`5`). Edits nest.
- `[a|b|c]` alternates every step (a, b, c, a, ...); options may be empty (`[fe|]male`).
- `a cat AND a dog :1.2` is two prompts whose guidance directions are added, each with its weight (composable
  diffusion, Liu et al. 2022); each part has its own edits.
Emphasis `(word:1.2)`, `[word]`, escapes `\\[` and `<lora:...>` tags pass through as text for prompts.py. Text that
does not parse (unbalanced brackets, a `|` outside an alternation) is kept as it is, as the web UI keeps it.

A schedule is a list of (last step, text), steps counted from 1 as in the web UI: `[a:b:0.5]` over 10 steps is
[(5, "a"), (10, "b")]. The sampler's step i (from 0) uses the first entry whose last step is >= i.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar, Union

import torch
from torch import Tensor

T = TypeVar("T")
U = TypeVar("U")

_TOKEN = re.compile(r"\\.|\\|[][():|]|[^\\\[\]():|]+")   # escape, lone backslash (unparsable), syntax, plain text
_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*")
_STRAY = {"[", "]", "(", ")", ":"}
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^([\s\S]*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


@dataclass
class Edit:
    """`[before:after:when]`; before is None for `[after:when]`."""

    before: list[Node] | None
    after: list[Node]
    when: str   # as written, with its spaces

    def as_text(self) -> list[Node]:
        """The same brackets read as plain text (the nodes inside keep their meaning)."""
        before = [*self.before, ":"] if self.before is not None else []
        return ["[", *before, *self.after, ":", self.when, "]"]


@dataclass
class Alternate:
    """`[a|b|c]`: option (step - 1) mod n at step `step`."""

    options: list[list[Node]]


Node = Union[str, list, Edit, Alternate]   # a list is a sequence of nodes (an emphasis bracket and its content)


@dataclass
class _Frame:
    """An open bracket while parsing: its kind, token position, and content segments split at `:` / `|`."""

    bracket: str
    start: int
    segments: list[list[Node]]
    separators: list[str]


def parse(prompt: str) -> list[Node] | None:
    """The prompt as a tree of text, brackets, edits and alternations; None when it does not parse.

    Brackets nest strictly inside a construct; at the top level a bracket that opens no valid construct is text.
    Each opening bracket is tried once (a construct's validity depends only on the text after it), so a failed
    bracket costs one re-scan of what it held: linear time, no recursion.
    """
    tokens = _TOKEN.findall(prompt)
    built: dict[int, tuple[Node, int]] = {}   # token index of an opening bracket -> (its construct, index after it)
    failed: set[int] = set()
    top: list[Node] = []
    frames: list[_Frame] = []
    i = 0
    while i < len(tokens) or frames:
        token = tokens[i] if i < len(tokens) else None
        items = frames[-1].segments[-1] if frames else top
        if token in ("[", "(") and i in built:
            node, i = built[i]
            items.append(node)
            continue
        if token in ("[", "(") and i not in failed:
            frames.append(_Frame(token, i, [[]], []))
        elif frames and token in (":", "|", "]", ")"):
            node = _close(frames[-1], token) if token in "])" else _separate(frames[-1], token)
            if node is False:
                i = _fail(frames, failed)
                continue
            if node is not None:
                built[frames[-1].start] = (node, i + 1)
                frames.pop()
                (frames[-1].segments[-1] if frames else top).append(node)
        elif frames and (token is None or token in ("[", "(")):   # unclosed, or holds a bracket that failed
            i = _fail(frames, failed)
            continue
        elif token == "|" or token == "\\":
            return None
        else:
            items.append(token)
        i += 1
    return as_web_ui_reads(top)


def as_web_ui_reads(top: list[Node]) -> list[Node]:
    """The web UI's parser (an ambiguous grammar resolved by lark's Earley parser) reads a top-level edit followed
    by an even number (>= 2) of stray bracket characters as plain text: `[a:b:2]((x` is literal, `[a:b:2](x` is
    an edit. Applied right to left, since reading an edit as text can make the run after an edit before it even.
    """
    out: list[Node] = []
    run = 0   # stray bracket characters right after the node being looked at
    work = list(top)
    while work:
        node = work.pop()
        if isinstance(node, Edit) and run >= 2 and run % 2 == 0:
            work.extend(node.as_text())
            continue
        run = run + 1 if isinstance(node, str) and node in _STRAY else 0
        out.append(node)
    return out[::-1]


def _separate(frame: _Frame, separator: str) -> None | bool:
    """Start a new segment at `:` or `|`; False when the bracket cannot hold it (`(a|b)`, `(a:b:c)`)."""
    if frame.bracket == "(" and (separator == "|" or frame.separators):
        return False
    frame.separators.append(separator)
    frame.segments.append([])
    return None


def _close(frame: _Frame, closer: str) -> Node | bool:
    """The construct a closing bracket completes, or False when there is none."""
    if closer != {"[": "]", "(": ")"}[frame.bracket]:
        return False
    first, *rest = frame.segments
    if frame.bracket == "(":
        return ["(", first, *([":", rest[0]] if rest else []), ")"]
    if not frame.separators:
        return ["[", first, "]"]
    if set(frame.separators) == {"|"}:
        return Alternate(frame.segments)
    last = frame.segments[-1]
    number = len(last) == 1 and isinstance(last[0], str) and _NUMBER.fullmatch(last[0])
    if set(frame.separators) != {":"} or len(frame.separators) > 2 or not number:
        return False
    before, after = (None, first) if len(rest) == 1 else (first, rest[0])
    return Edit(before, after, last[0])


def _fail(frames: list[_Frame], failed: set[int]) -> int:
    """Every open bracket fails with the innermost: it holds it. Re-scan from the outermost, now as text."""
    failed.update(frame.start for frame in frames)
    start = frames[0].start
    frames.clear()
    return start


def edit_step(when: str, steps: int) -> int:
    """The last step of an edit's first part: `when` with a decimal point is a fraction of steps, else a step."""
    value = float(when) * steps if "." in when else float(when)   # float() ignores the spaces around
    return int(max(0.0, min(float(steps), value)))


def render(nodes: list[Node], step: int, steps: int) -> str:
    """The prompt's text at `step` (counted from 1)."""
    out: list[str] = []
    stack = [iter(nodes)]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
        elif isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            stack.append(iter(node))
        elif isinstance(node, Edit):
            stack.append(iter((node.before or []) if step <= edit_step(node.when, steps) else node.after))
        else:
            stack.append(iter(node.options[(step - 1) % len(node.options)]))
    return "".join(out)


def change_steps(nodes: list[Node], steps: int) -> set[int]:
    """The steps after which the text can change: each edit's step, every step with an alternation."""
    ends = {steps}
    stack: list[Node] = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, Edit):
            ends |= {edit_step(node.when, steps)} - {0}
            stack.extend([*(node.before or []), *node.after])
        elif isinstance(node, Alternate):
            ends |= set(range(1, steps + 1))
            stack.extend(option for options in node.options for option in options)
    return ends


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text), ...] of a prompt with edits and alternations (the web UI's prompt schedule)."""
    nodes = parse(prompt)
    if nodes is None:
        return [(steps, prompt)]
    return [(end, render(nodes, end, steps)) for end in sorted(change_steps(nodes, steps))]


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """Split `a AND b :1.2` into (text, weight) parts; a part's weight is a trailing `:number`, else 1."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.match(part).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


@dataclass(frozen=True)
class ScheduledConditioning(Generic[T]):
    """A prompt's AND parts, each a schedule [(last step, value), ...] with its weight: at first the values are
    texts; `map` turns every distinct one into its encoding once; `at(step)` is what guidance reads per step."""

    parts: list[tuple[list[tuple[int, T]], float]]

    @classmethod
    def parse(cls, prompt: str, steps: int, composable: bool = True) -> ScheduledConditioning[str]:
        """The schedules of a prompt's AND parts (composable), or of the whole text (a negative prompt)."""
        parts = composable_parts(prompt) if composable else [(prompt, 1.0)]
        return cls([(prompt_schedule(text, steps), weight) for text, weight in parts])

    def values(self) -> list[T]:
        """Every distinct value, in order of first use."""
        return list(dict.fromkeys(value for schedule, _ in self.parts for _, value in schedule))

    def map(self, fn: Callable[[T], U]) -> ScheduledConditioning[U]:
        """The same schedules with fn(value) for each value, fn called once per distinct value."""
        table = {value: fn(value) for value in self.values()}
        return ScheduledConditioning([([(end, table[value]) for end, value in schedule], weight)
                                      for schedule, weight in self.parts])

    def at(self, step: int) -> list[tuple[T, float]]:
        """(value, weight) of every part at sampler step `step` (from 0): its first entry whose last step >= step."""
        return [(next((value for end, value in schedule if step <= end), schedule[-1][1]), weight)
                for schedule, weight in self.parts]


@dataclass(frozen=True)
class BatchConditioning:
    """The schedules of a batch's rows read as one batch: part k of every row side by side (a row with fewer AND
    parts than another repeats its first part with weight 0), its weight one number when the rows agree."""

    rows: list[ScheduledConditioning[dict[str, Tensor]]]

    def at(self, step: int) -> list[tuple[dict[str, Tensor], float | Tensor]]:
        """(inputs of all rows, weight or per-row weights) of every part at sampler step `step` (from 0)."""
        per_row = [row.at(step) for row in self.rows]
        n = max(len(parts) for parts in per_row)
        per_row = [parts + [(parts[0][0], 0.0)] * (n - len(parts)) for parts in per_row]
        batched = []
        for k in range(n):
            inputs = [parts[k][0] for parts in per_row]
            weights = [parts[k][1] for parts in per_row]
            weight = weights[0] if len(set(weights)) == 1 else torch.tensor(weights)
            batched.append(({key: torch.cat([row[key] for row in inputs]) for key in inputs[0]}, weight))
        return batched


Inputs = Callable[[dict[str, Tensor], dict[str, Tensor], list[int]], tuple[dict[str, Tensor], dict[str, Tensor]]]


def batch_conditioning(encode: Callable[[list[str]], dict[str, Tensor]], inputs: Inputs, prompts: list[str],
                       negatives: list[str], steps: int) -> tuple[BatchConditioning, BatchConditioning]:
    """Guidance inputs of a batch of prompts (edits, alternations, AND parts) and negative prompts (edits and
    alternations; AND is text there, as in the web UI), each schedule over `steps`.

    `encode(texts)` -> {name: [n, ...]} (e.g. "context" [n, L, D]): every distinct text once, all in one call, so
    all get the same number of chunks. `inputs(cond, uncond, rows)` -> (cond dict, uncond dict): the guidance
    inputs of encoded rows, cond row r belonging to batch row rows[r] (a layout stage draws that row's boxes).
    """
    conds = [ScheduledConditioning.parse(prompt, steps) for prompt in prompts]
    unconds = [ScheduledConditioning.parse(negative, steps, composable=False) for negative in negatives]
    texts = list(dict.fromkeys(text for schedule in conds + unconds for text in schedule.values()))
    encoded = encode(texts)
    index = {text: k for k, text in enumerate(texts)}
    cond_rows = [(b, text) for b, schedule in enumerate(conds) for text in schedule.values()]
    uncond_rows = [(b, text) for b, schedule in enumerate(unconds) for text in schedule.values()]

    def rows_of(rows: list[tuple[int, str]]) -> dict[str, Tensor]:
        return {name: value[[index[text] for _, text in rows]] for name, value in encoded.items()}

    cond_in, uncond_in = inputs(rows_of(cond_rows), rows_of(uncond_rows), [b for b, _ in cond_rows])
    return by_row(conds, cond_rows, cond_in), by_row(unconds, uncond_rows, uncond_in)


def by_row(schedules: list[ScheduledConditioning[str]], rows: list[tuple[int, str]],
           table: dict[str, Tensor]) -> BatchConditioning:
    """Each batch row's schedule over its own rows of the inputs; rows[r] is the (batch row, text) of input row r."""
    where = {row: r for r, row in enumerate(rows)}

    def inputs_of(b: int) -> Callable[[str], dict[str, Tensor]]:
        return lambda text: {key: value[where[b, text]:where[b, text] + 1] for key, value in table.items()}

    return BatchConditioning([schedule.map(inputs_of(b)) for b, schedule in enumerate(schedules)])
