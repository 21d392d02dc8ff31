"""Prompt functions: each draws one (prompt, metadata) pair from a numpy Generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

PromptFn = Callable[[np.random.Generator], tuple[str, dict[str, Any]]]

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle ant butterfly fish shark whale dolphin elephant giraffe camel kangaroo panda koala owl"
).split()


def simple_animals(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    return str(rng.choice(SIMPLE_ANIMALS)), {}


def from_file(path: Path) -> PromptFn:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt.path: {path} has no prompts")
    return lambda rng: (lines[rng.integers(len(lines))], {})


def make_prompt_fn(name: str, path: Path | None = None) -> PromptFn:
    if name == "simple_animals":
        return simple_animals
    if name == "from_file":
        return from_file(path)
    raise ValueError(f"prompt.fn: unknown prompt function {name!r}")
