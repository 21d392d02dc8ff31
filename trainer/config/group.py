"""The base of every settings group: unknown keys are errors, not silently ignored; every number is finite and
bounded; and a rejected value is not echoed in the error (pydantic's input_value), since it may hold a secret
(a password in a reward URL): each validator's own message says what is wrong, with secrets masked. And the
reading of ``--config`` files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

# Whatever a setting counts (steps, seconds, images, a seed), past this it is a typo or an attack: torch,
# numpy and the OS refuse larger seeds, timeouts and sizes later, with a traceback after the model has loaded.
MAGNITUDE = 2**31 - 1
MAX_DEPTH = 32  # of a --config file's nesting: settings nest 4 deep (reward.components.0.options)


class Bounded(BaseModel):
    """Every number finite and within +-MAGNITUDE: one check for every numeric setting of every settings class
    (each group of the trainer's config, and the other commands'), a field's own bounds coming on top."""

    # allow_inf_nan: NaN passes every gt/ge/lt bound (all comparisons are false), and inf most of them
    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        if type(value) in (int, float) and abs(value) > MAGNITUDE:
            raise ValueError(f"must lie between -{MAGNITUDE} and {MAGNITUDE}")
        return value


class _Group(Bounded):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # with Bounded's


def read_settings_file(path: Path) -> dict[str, Any]:
    """The settings of ``--config``; ValueError "config: <file> ..." saying why it cannot be read."""
    from trainer.prompts import read_small_text

    try:
        text = read_small_text(path, "config files")  # a FIFO or /dev/zero given as --config: refused unread
    except ValueError as exc:
        raise ValueError(f"config: {exc}") from None
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"config: {path} must be .json or .toml")
    too_deep = f"config: {path} nests deeper than {MAX_DEPTH} levels"
    try:
        settings = _parsed(path, text)
    except RecursionError:  # the parsers recurse per level: 100,000 brackets exhaust the stack
        raise ValueError(too_deep) from None
    if not isinstance(settings, dict):
        raise ValueError(f"config: {path} must hold a map of settings, not a {type(settings).__name__}")
    if _depth(settings) > MAX_DEPTH:  # merging and validating recurse too
        raise ValueError(too_deep)
    return settings


def _parsed(path: Path, text: str) -> Any:
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)  # a TOML document is always a table
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config: {path} is not valid TOML ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"config: {path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None


def _depth(value: Any) -> int:
    """How deeply lists and maps nest in ``value``, found without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def overridden(base: dict, **groups: dict | str) -> dict:
    """A preset from another: each group's settings updated (one level deep), top-level settings replaced."""
    out = copy.deepcopy(base)
    for group, values in groups.items():
        if isinstance(values, dict):
            out.setdefault(group, {}).update(values)
        else:  # a top-level setting (algorithm)
            out[group] = values
    return out
