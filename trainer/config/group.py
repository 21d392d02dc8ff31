"""The reading of ``--config`` files, and ``overridden`` (a preset from another). The base of every settings
group (trainer/groups.py, imported from here too): unknown keys are errors, not silently ignored; every number
is finite and bounded; and a rejected value is not echoed in the error (pydantic's input_value), since it may
hold a secret (a password in a reward URL): each validator's own message says what is wrong, with secrets
masked."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from trainer.groups import MAGNITUDE, Bounded, _Group  # noqa: F401  (the bases, imported from here too)

MAX_DEPTH = 32  # of a --config file's nesting: settings nest 4 deep (reward.components.0.options)


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


def one_gpu(preset: dict[str, Any], gpus: int) -> dict[str, Any]:
    """``preset``'s ``-1gpu`` variant: the same epoch and effective train batch on one GPU."""
    t = preset["train"]
    return overridden(
        preset,
        sample={"num_batches_per_epoch": preset["sample"]["num_batches_per_epoch"] * gpus},
        # the same samples per denoiser forward as each of the GPUs had: the same memory
        train={
            "batch_size": 1,
            "gradient_accumulation_steps": t["batch_size"] * gpus * t["gradient_accumulation_steps"],
            "timesteps_per_forward": t["timesteps_per_forward"] * t["batch_size"],
        },
    )
