"""Prompt styles: the popular web UI's styles.csv (columns name, prompt, negative_prompt), applied by name.

A style's text goes where its "{prompt}" placeholder is, else after the prompt joined by ", " (the web UI's
modules/styles.py `merge_prompts`). "None" is the web UI's name for no style.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import NanoDiffusionError, choice_error

NO_STYLE = "None"


@dataclass(frozen=True)
class Style:
    """One row of a styles file."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def load_styles(path: str | Path | None) -> dict[str, Style]:
    """Read a styles.csv into {name: Style}; no path -> no styles."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise NanoDiffusionError(f"styles file {path} does not exist: pass a CSV with columns "
                                 "name,prompt,negative_prompt")
    with open(path, encoding="utf-8-sig", newline="") as file:
        rows = list(csv.DictReader(file, skipinitialspace=True))
    if rows and "name" not in rows[0]:
        raise NanoDiffusionError(f"styles file {path.name} has no 'name' column: its first line must be "
                                 "name,prompt,negative_prompt")
    return {row["name"]: Style(row["name"], row.get("prompt") or "", row.get("negative_prompt") or "")
            for row in rows if row.get("name")}


def merge_prompt(style_text: str, prompt: str) -> str:
    """A style's text with the prompt in its {prompt} placeholder, else appended after the prompt."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt, style_text) if part)


def apply_styles(prompt: str, negative_prompt: str, names: list[str],
                 styles: dict[str, Style]) -> tuple[str, str]:
    """The prompts with the named styles applied in order; an unknown name is an error listing the styles."""
    for name in names:
        if name in (NO_STYLE, ""):
            continue
        if name not in styles:
            raise choice_error("style", name, list(styles) or ["(none loaded: pass --styles-file CSV)"])
        prompt = merge_prompt(styles[name].prompt, prompt)
        negative_prompt = merge_prompt(styles[name].negative_prompt, negative_prompt)
    return prompt, negative_prompt
