"""Property tests (Hypothesis) for the prompt syntax and the PNG parameters text.

The emphasis and `<lora:>` parsers are checked against the straightforward algorithms they replace (kept
here as oracles: quadratic, but exact), must raise nothing but NanoDiffusionError, and must take linear time
on the inputs that made the old ones quadratic (measured as CPU time of this thread, a ratio between sizes).
"""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.lora_files import extract_lora_tags
from nanodiffusion.prompt_schedule import composable_parts, prompt_schedule
from nanodiffusion.prompts import (
    EMPHASIS,
    MAX_EMPHASIS,
    MAX_PROMPT_CHARS,
    check_prompt,
    format_parameters,
    parse_emphasis,
    parse_parameters,
)

SYNTAX = st.lists(st.sampled_from(["(", ")", "[", "]", ":", ":1.3)", ":0.5", ":-2)", ":1.2.3)", "\\", "\\(", "a",
                                   "b c", " ", "<lora:", ">", "x:0.8>", ":nan>", "<lora:y>", "é", "\n"]),
                  max_size=40).map("".join)
TEXT = st.one_of(SYNTAX, st.text(max_size=60))
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def emphasis_oracle(text: str) -> list[tuple[str, float]]:
    """The web UI's algorithm: scale every run from an opening bracket's position when it closes."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        opened = round_open if token in "()" or weight is not None else square_open
        if token.startswith("\\"):
            runs.append([token[1:] or token, 1.0])
        elif token in ("(", "["):
            (round_open if token == "(" else square_open).append(len(runs))
        elif token in (")", "]") or weight is not None:
            if not opened:
                runs.append([token, 1.0])
                continue
            factor = float(weight) if weight is not None else EMPHASIS if token == ")" else 1 / EMPHASIS
            for run in runs[opened.pop():]:
                run[1] *= factor
        else:
            runs.append([token, 1.0])
    for start in round_open:
        for run in runs[start:]:
            run[1] *= EMPHASIS
    for start in square_open:
        for run in runs[start:]:
            run[1] /= EMPHASIS
    return [(text, weight) for text, weight in runs]


def per_character(runs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(char, weight) for text, weight in runs for char in text]


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_emphasis_matches_the_web_ui_algorithm_or_raises_our_error(text):
    try:
        runs = parse_emphasis(text)
    except NanoDiffusionError as error:
        assert "emphasis weight" in str(error)
        return
    assert all(math.isfinite(weight) and abs(weight) <= MAX_EMPHASIS for _, weight in runs)
    expected = per_character(emphasis_oracle(text))
    got = per_character(runs)
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert all(math.isclose(a, b, rel_tol=1e-9) for (_, a), (_, b) in zip(got, expected))


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_lora_tags_match_the_regex_or_raise_our_error(text):
    try:
        rest, tags = extract_lora_tags(text)
    except NanoDiffusionError as error:
        assert "LoRA" in str(error)
        return
    expected = [(m.group(1).strip(), m.group(2)) for m in _TAG.finditer(text)]
    assert [name for name, _ in tags] == [name for name, _ in expected]
    assert all(math.isfinite(weight) and abs(weight) <= 10 for _, weight in tags)
    assert rest == re.sub(r"\s{2,}", " ", _TAG.sub("", text)).strip()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_text_gives_our_error_or_a_checked_prompt(text):
    try:
        check_prompt(text)
        extract_lora_tags(text)
        parse_emphasis(text)
    except NanoDiffusionError:
        pass


SCHEDULE_PIECES = ["[", "]", "(", ")", ":", "|", "a", "b c", " ", "2", "0.5", ".5", "-1", "1e1", "\\", "\\[", "AND",
                   ":0.8", "BREAK", "[a:b:2]", "[a|b]", "é", "\n"]
SCHEDULE_SYNTAX = st.lists(st.sampled_from(SCHEDULE_PIECES), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(SCHEDULE_SYNTAX, st.text(max_size=60)), st.integers(1, 30))
def test_prompt_schedules_are_well_formed_for_any_text(text, steps):
    schedule = prompt_schedule(text, steps)
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    if "[" not in text:   # no edit, no alternation: the text as it is
        assert schedule == [(steps, text)]
    assert all(len(part) <= len(text) for _, part in schedule)
    parts = composable_parts(text)
    assert len(parts) == len(re.findall(r"\bAND\b", text)) + 1 and all(math.isfinite(w) for _, w in parts)


ADVERSARIAL_SCHEDULES = {
    "unclosed edits": lambda n: "[a:" * (n // 3),
    "nested edits": lambda n: "[" * (n // 8) + "a:b:2" + "]" * (n // 8),
    "alternations in emphasis": lambda n: "([a|b]" * (n // 6),
    "failing brackets in brackets": lambda n: "[(" * (n // 2),
    "stray runs after edits": lambda n: "[a:b:2]((" * (n // 9),
}


@pytest.mark.parametrize("family", ADVERSARIAL_SCHEDULES)
def test_prompt_schedule_handles_the_longest_prompts(family):
    """No recursion: a prompt of MAX_PROMPT_CHARS nested brackets is parsed, not a RecursionError."""
    assert prompt_schedule(ADVERSARIAL_SCHEDULES[family](MAX_PROMPT_CHARS), 20)[-1][0] == 20


def cpu_seconds(function, text: str) -> float:
    """Least CPU time of this thread over a few runs (other processes' load does not count)."""
    best = math.inf
    for _ in range(3):
        start = time.thread_time()
        try:
            function(text)
        except NanoDiffusionError:
            pass
        best = min(best, time.thread_time() - start)
    return best


ADVERSARIAL = {
    "unclosed lora tags": lambda n: "<lora:a" * (n // 7),
    "nameless lora tags then >": lambda n: "<lora::" * (n // 7) + ">",
    "nested emphasis": lambda n: "(a" * (n // 4) + ")" * (n // 4),
    "interleaved brackets": lambda n: "(a[b" * (n // 8) + ")]" * (n // 8),
    "weights without brackets": lambda n: "a:1.1)" * (n // 6),
    "colon and spaces": lambda n: ":" + " " * (n - 1),
    "backslashes": lambda n: "\\" * n,
}


@pytest.mark.parametrize("family", ADVERSARIAL)
@pytest.mark.parametrize("parser", [extract_lora_tags, parse_emphasis], ids=["lora_tags", "emphasis"])
def test_parsers_take_linear_time(family, parser):
    small, large = (ADVERSARIAL[family](n) for n in (MAX_PROMPT_CHARS // 8, MAX_PROMPT_CHARS))
    ratio = cpu_seconds(parser, large) / max(cpu_seconds(parser, small), 1e-4)
    assert ratio < 24, f"{family}: 8x the text took {ratio:.0f}x the time (linear: ~8, quadratic: ~64)"


SETTING_KEYS = st.from_regex(r"\A[A-Za-z][A-Za-z ]{0,12}\Z")
PROMPTS = st.text(max_size=60).filter(lambda t: t == t.strip() and "Negative prompt: " not in t)


@settings(max_examples=300, deadline=None)
@given(PROMPTS, PROMPTS, st.dictionaries(SETTING_KEYS, st.one_of(st.integers(), st.text(max_size=20)),
                                         min_size=1, max_size=6))
def test_png_parameters_round_trip(prompt, negative, values):
    text = format_parameters(prompt, negative, values)
    assert parse_parameters(text) == (prompt, negative, {key: str(value) for key, value in values.items()})
