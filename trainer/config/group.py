"""The base of every settings group: unknown keys are errors, not silently ignored; and a rejected value is
not echoed in the error (pydantic's input_value), since it may hold a secret (a password in a reward URL):
each validator's own message says what is wrong, with secrets masked. And the reading of ``--config`` files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings of ``--config``; ValueError "config: <file> ..." saying why it cannot be read."""
    if not path.is_file():
        raise ValueError(f"config: no such file {path}")
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"config: {path} must be .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"config: {path} cannot be read ({exc.strerror or exc})") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)  # a TOML document is always a table
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config: {path} is not valid TOML ({exc})") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"config: {path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"config: {path} must hold a map of settings, not a {type(settings).__name__}")
    return settings


def overridden(base: dict, **groups: dict | str) -> dict:
    """A preset from another: each group's settings updated (one level deep), top-level settings replaced."""
    out = copy.deepcopy(base)
    for group, values in groups.items():
        if isinstance(values, dict):
            out.setdefault(group, {}).update(values)
        else:  # a top-level setting (algorithm)
            out[group] = values
    return out
