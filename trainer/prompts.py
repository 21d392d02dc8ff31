"""Prompt functions: each draws one (prompt, metadata) pair from a numpy Generator.

The sets our users know from ddpo-pytorch, from data files shipped in ``trainer/assets``. Metadata travels
with each image to the scorer (``counting`` carries the questions and answers for strict VQA scoring).

Your own function (``--prompt.fn module:function``, or ``train(cfg, prompt_fn=...)``) may take the
Generator, ``fn(rng)``, or nothing, ``fn()``, as ddpo-pytorch's and TRL's do; it returns a prompt or a
``(prompt, metadata)`` pair. Prefer ``fn(rng)``: that Generator is seeded per process from ``run.seed`` and
saved in every checkpoint, so a resumed run draws exactly the prompts it would have drawn. (Python's
``random`` is seeded and checkpointed too, so ``fn()`` built on it resumes exactly as well; any other
source of randomness does not.)
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Callable

import inspect
import json

import numpy as np

PromptFn = Callable[[np.random.Generator], tuple[str, dict[str, Any]]]
ASSETS = Path(__file__).parent / "assets"
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


MAX_TEXT_FILE = 64 * 1024**2  # bytes of a prompt or --config file: read whole, before any model loads


def split_lines(text: str) -> list[str]:
    """One entry per line, ended by \n or \r\n only: str.splitlines also splits at a form feed, \x1c-\x1e,
    \x85 or U+2028/2029 inside a prompt."""
    return [line.removesuffix("\r") for line in text.split("\n")]


@cache
def lines(path: Path, what: str = "prompt.path") -> tuple[str, ...]:
    found = tuple(line.strip() for line in split_lines(Path(path).read_text(encoding="utf-8")) if line.strip())
    if not found:
        raise ValueError(f"{what}: {path} has no prompts")
    return found


def read_small_text(path: Path, what: str, limit: int = MAX_TEXT_FILE) -> str:
    """A settings file's text (a prompt file, --config), read whole before any model loads; ValueError saying
    why not. Only a regular file of bounded size is opened: a FIFO would wait for a writer, /dev/zero never end."""
    import os
    import stat

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path} is {info.st_size} bytes; {what} are at most {limit}")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such file {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None


def file_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a prompt file (one prompt per line, UTF-8), said before any model loads."""
    try:
        text = read_small_text(path, "prompt files")
    except ValueError as exc:
        return str(exc)
    return None if any(line.strip() for line in split_lines(text)) else f"{path} has no prompts"


def checked_file(path: Path | None) -> Path | None:
    """A settings validator: a prompt file read now, so that an empty or binary one fails before any model loads."""
    problem = None if path is None else file_problem(path)
    if problem:
        raise ValueError(problem)
    return path


def imagenet(first: int = 0, last: int = 999) -> PromptFn:
    names = [line.split(",")[0].strip() for line in lines(ASSETS / "imagenet_classes.txt")[first : last + 1]]
    return lambda rng: (names[rng.integers(len(names))], {})


def simple_animals(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    animals = lines(ASSETS / "simple_animals.txt")
    return animals[rng.integers(len(animals))], {}


def nouns_activities(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """'a {animal} {activity}', the prompt-alignment experiment's prompts."""
    animals, activities = lines(ASSETS / "simple_animals.txt"), lines(ASSETS / "activities.txt")
    return f"a {animals[rng.integers(len(animals))]} {activities[rng.integers(len(activities))]}", {}


def counting(low: int = 1, high: int = 4) -> PromptFn:
    """'{number} {animal}s' with the question and answer a strict VQA scorer checks."""

    def draw(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
        animals = lines(ASSETS / "simple_animals.txt")
        animal, n = animals[rng.integers(len(animals))], int(rng.integers(low, high + 1))
        plural = animal if n == 1 else f"{animal}s"
        return f"{NUMBERS[n]} {plural}", {
            "questions": [f"How many {animal}s are there in this image?"],
            "answers": [NUMBERS[n]],
        }

    return draw


def shapes(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A training caption of the shapes world (a category uniformly, then one of its captions) with the claims
    its verifier checks (scorers/world.py)."""
    from scorers import world

    caption, _ = world.sample_caption(rng, "train")
    return caption, {"claims": world.claims(caption)}


# Every single_object prompt GenEval can write (one per COCO class) is one of its 553 evaluation prompts, so
# training draws the other five tags, as Flow-GRPO's training split (its evaluation prompts filtered out).
GENEVAL_TRAIN_TAGS = ("two_object", "counting", "colors", "position", "color_attr")


@cache
def geneval_evaluation() -> tuple[tuple[str, dict[str, Any]], ...]:
    """GenEval's 553 evaluation prompts with their metadata (trainer/assets/geneval, MIT, Ghosh et al. 2023)."""
    rows = [json.loads(line) for line in lines(ASSETS / "geneval" / "evaluation_metadata.jsonl")]
    return tuple((row["prompt"], {k: v for k, v in row.items() if k != "prompt"}) for row in rows)


def geneval(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A GenEval training prompt and its metadata (what the geneval scorer checks): a tag uniformly, then a
    prompt drawn from GenEval's templates as its create_prompts.py draws them, never an evaluation prompt."""
    from scorers.geneval_rules import sample

    held_out = {prompt for prompt, _ in geneval_evaluation()}
    tag = GENEVAL_TRAIN_TAGS[rng.integers(len(GENEVAL_TRAIN_TAGS))]
    while True:
        row = sample(rng, tag)
        if row["prompt"] not in held_out:
            return row.pop("prompt"), row


def ocr(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """A text-rendering prompt in the style of Flow-GRPO's OCR set: a scene whose quoted text the image must
    show (24 scenes x 48 texts in trainer/assets/ocr; no text is one of its evaluation prompts' texts,
    ocr/flow_grpo_test.txt, for --prompt.eval_path)."""
    scenes, texts = lines(ASSETS / "ocr" / "train_scenes.txt"), lines(ASSETS / "ocr" / "train_texts.txt")
    return scenes[rng.integers(len(scenes))].format(text=texts[rng.integers(len(texts))]), {}


def from_file(path: Path) -> PromptFn:
    prompts = lines(Path(path))
    return lambda rng: (prompts[rng.integers(len(prompts))], {})


PROMPT_FNS: dict[str, Callable[[], PromptFn]] = {
    "imagenet_all": lambda: imagenet(),
    "imagenet_animals": lambda: imagenet(0, 397),
    "imagenet_dogs": lambda: imagenet(151, 268),
    "simple_animals": lambda: simple_animals,
    "nouns_activities": lambda: nouns_activities,
    "counting": lambda: counting(),
    "shapes": lambda: shapes,
    "geneval": lambda: geneval,
    "ocr": lambda: ocr,
}


def user_prompt_fn(fn: Callable[..., Any], what: str = "prompt_fn") -> PromptFn:
    """Your function as a PromptFn: called with the Generator if it takes an argument, else with none."""
    if not callable(fn):
        raise ValueError(f"{what}: {fn!r} is not a function")
    try:
        takes_rng = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in inspect.signature(fn).parameters.values()
        )
    except (TypeError, ValueError):  # a builtin without a signature: assume the anchors' fn()
        takes_rng = False

    def draw(rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
        out = fn(rng) if takes_rng else fn()
        pair = (out, {}) if isinstance(out, str) else out
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], (dict, type(None)))
        ):
            raise ValueError(f"{what} must return a prompt (str) or (prompt, metadata dict); it returned {out!r:.200}")
        return pair[0], dict(pair[1] or {})

    return draw


def make_prompt_fn(name: str, path: Path | None = None) -> PromptFn:
    if name == "from_file":
        return from_file(path)
    if ":" in name:
        from scorers.scorer import import_attribute

        return user_prompt_fn(import_attribute(name, "prompt.fn"), f"prompt.fn {name}")
    return PROMPT_FNS[name]()
