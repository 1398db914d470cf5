"""The shapes world's words: the structured prompt, its caption grammar, and the parser back.

A structured `Prompt` lists the objects an image must contain, as (shape, colour) pairs where the
colour may be None (unspecified), plus an optional spatial relation between the first two. Its
kind names the GenEval category it tests (Ghosh et al. 2023, "GenEval: An Object-Focused Framework
for Evaluating Text-to-Image Alignment"): single object, two objects, counting, colours, position,
colour attribution. `caption` realises a prompt in one of a few phrasings of a small grammar;
`parse_caption` reads any of them back to exactly the same prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..errors import NanoDiffusionError

COLORS = ("red", "yellow", "green", "cyan", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "star")
KINDS = ("single", "two", "counting", "colors", "position", "color_attr")
NUMBERS = ("one", "two", "three", "four")
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below",),
}
RELATIONS = tuple(RELATION_PHRASES)
_ALL_RELATION_PHRASES = tuple(phrase for phrases in RELATION_PHRASES.values() for phrase in phrases)
PREFIXES = ("", "a picture of ", "an image of ")


@dataclass(frozen=True)
class Prompt:
    """What an image must show: objects as (shape, colour or None), and `relation` of object 0 to 1."""

    kind: str
    objects: tuple[tuple[str, str | None], ...]
    relation: str | None = None


def _noun_phrase(shape: str, color: str | None, determiner: str = "a") -> str:
    """'a red circle', 'a circle', 'three red circles'."""
    noun = shape if determiner in ("a", "one") else shape + "s"
    return " ".join(word for word in (determiner, color, noun) if word)


def caption(prompt: Prompt, rng: random.Random) -> str:
    """One phrasing of the prompt, drawn with rng from the grammar."""
    objects = prompt.objects
    if prompt.kind == "counting":
        shape, color = objects[0]
        body = _noun_phrase(shape, color, NUMBERS[len(objects) - 1])
    elif prompt.relation is not None:
        phrase = rng.choice(RELATION_PHRASES[prompt.relation])
        body = f"{_noun_phrase(*objects[0])} {phrase} {_noun_phrase(*objects[1])}"
    else:
        body = " and ".join(_noun_phrase(shape, color) for shape, color in objects)
    return rng.choice(PREFIXES) + body


VOCABULARY: list[str] = sorted({word for phrase in (*PREFIXES, "a and", *COLORS, *SHAPES, *NUMBERS,
                                                     *(shape + "s" for shape in SHAPES), *_ALL_RELATION_PHRASES)
                                 for word in phrase.split()})

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJECT = re.compile(rf"(a|an|one|two|three|four) (?:({_COLOR}) )?({_SHAPE})(s?)")
_RELATION = re.compile(r" (" + "|".join(sorted(_ALL_RELATION_PHRASES, key=len, reverse=True)) + r") ")
_PREFIX = re.compile(r"^(?:a picture of|an image of|a photo of) ")


def _unreadable(text: str) -> NanoDiffusionError:
    """The error for text outside the grammar, with examples of what it reads."""
    return NanoDiffusionError(
        f"cannot read {text!r} as a shapes prompt: write e.g. 'a red circle', 'three blue stars', "
        f"'a red circle above a blue square' (colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)})")


def _parse_object(text: str, original: str) -> tuple[str, str | None, str]:
    """'three red circles' -> ('circle', 'red', 'three'); plural exactly when counting above one."""
    match = _OBJECT.fullmatch(text)
    if match is None or bool(match.group(4)) != (match.group(1) in NUMBERS[1:]):
        raise _unreadable(original)
    return match.group(3), match.group(2), match.group(1)


def parse_caption(text: str) -> Prompt:
    """The structured prompt a caption of the grammar says (inverse of `caption`)."""
    body = _PREFIX.sub("", " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split()))
    relation = _RELATION.search(body)
    if relation:
        phrase = relation.group(1)
        name = next(key for key, phrases in RELATION_PHRASES.items() if phrase in phrases)
        parts = [body[: relation.start()], body[relation.end():]]
    else:
        name, parts = None, body.split(" and ")
    parsed = [_parse_object(part, text) for part in parts]
    objects = tuple((shape, color) for shape, color, _ in parsed)
    if len(parsed) == 1 and parsed[0][2] in NUMBERS:
        return Prompt("counting", objects * (NUMBERS.index(parsed[0][2]) + 1))
    if len(parsed) > 2 or any(word in NUMBERS for *_, word in parsed):
        raise _unreadable(text)
    specified = any(color for _, color in objects)
    if name:
        return Prompt("position", objects, name)
    if len(objects) == 1:
        return Prompt("colors" if specified else "single", objects)
    return Prompt("color_attr" if specified else "two", objects)
