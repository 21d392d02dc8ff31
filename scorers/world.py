"""The shapes world: captions with structured claims, and a seeded renderer of images that satisfy them.

A small stand-in for the GenEval benchmark (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment"), whose prompts check object presence, counts, colours and positions
with a detector. Here the objects are flat circles, squares and triangles in five named colours on a light,
lightly textured background, 1-4 of them per image, so a verifier made of arithmetic can check every claim
(scorers/shapes.py) and a model small enough for two CPU cores can learn to draw them
(trainer/tools/shapes_model.py).

Captions follow GenEval's six categories:

- single_object  "a circle"
- two_object     "a circle and a square"
- counting       "three triangles"
- colors         "a red circle"
- position       "a circle left of a square" (left of, right of, above, below)
- color_attr     "a red circle and a blue square"

``claims(caption)`` parses any caption of this grammar; ``CAPTIONS`` enumerates them all, and ``split``
holds a seeded quarter of each category out of pretraining (compositions the model never saw named).
"""

from __future__ import annotations

import itertools
import re
from functools import cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 165, 70),
    "blue": (45, 85, 220),
    "yellow": (235, 195, 30),
    "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3, "four": 4}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RESOLUTION = 64


def _enumerate() -> dict[str, list[str]]:
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    return {
        "single_object": [f"a {s}" for s in SHAPES],
        "two_object": [f"a {a} and a {b}" for a, b in pairs],
        "counting": [f"{n} {s}s" for n in NUMBERS for s in SHAPES],
        "colors": [f"a {c} {s}" for c in COLORS for s in SHAPES],
        "position": [f"a {a} {r} a {b}" for a, b in pairs for r in RELATIONS],
        "color_attr": [f"a {c} {a} and a {d} {b}" for a, b in pairs for c in COLORS for d in COLORS if c != d],
    }


CAPTIONS: dict[str, list[str]] = _enumerate()


@cache
def split(seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """{"train": {category: captions}, "heldout": {...}}: a seeded quarter of each category (at least one)
    held out."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[str]]] = {"train": {}, "heldout": {}}
    for category, captions in CAPTIONS.items():
        order = rng.permutation(len(captions))
        held = set(order[: max(1, len(captions) // 4)].tolist())
        out["heldout"][category] = [c for i, c in enumerate(captions) if i in held]
        out["train"][category] = [c for i, c in enumerate(captions) if i not in held]
    return out


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJECT = rf"a (?:(?P<{{0}}c>{_COLOR}) )?(?P<{{0}}s>{_SHAPE})"
_PATTERNS = [
    ("counting", re.compile(rf"(?P<n>{'|'.join(NUMBERS)}) (?P<s>{_SHAPE})s")),
    ("position", re.compile(f"{_OBJECT.format('a')} (?P<r>{'|'.join(RELATIONS)}) {_OBJECT.format('b')}")),
    ("pair", re.compile(f"{_OBJECT.format('a')} and {_OBJECT.format('b')}")),
    ("one", re.compile(_OBJECT.format("a"))),
]


def claims(caption: str) -> dict[str, Any]:
    """The category and claims of a caption of the world's grammar:

    {"category": ..., "objects": [{"shape", "color" (or None), "count" (exact, or None: at least one)}],
     "relation": None or {"a": 0, "b": 1, "rel": "left of"}}.

    A ValueError names what did not parse."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        if kind == "counting":
            return {
                "category": "counting",
                "objects": [{"shape": g["s"], "color": None, "count": NUMBERS[g["n"]]}],
                "relation": None,
            }
        objects = [{"shape": g[f"{k}s"], "color": g[f"{k}c"], "count": None} for k in "ab" if g.get(f"{k}s")]
        colored = any(o["color"] for o in objects)
        if kind == "position":
            category, relation = "position", {"a": 0, "b": 1, "rel": g["r"]}
        else:
            category = {
                ("pair", False): "two_object",
                ("pair", True): "color_attr",
                ("one", False): "single_object",
                ("one", True): "colors",
            }[kind, colored]
            relation = None
        return {"category": category, "objects": objects, "relation": relation}
    raise ValueError(
        f"caption {caption!r} is not in the shapes world's grammar (e.g. 'a red circle', 'three "
        f"squares', 'a circle left of a square', 'a red circle and a blue square')"
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectClaim(_Strict):
    shape: Literal[SHAPES]
    color: Literal[tuple(COLORS)] | None = None
    count: StrictInt | None = Field(None, ge=1, description="exactly this many; None: at least one")


class RelationClaim(_Strict):
    a: StrictInt = Field(ge=0, description="index of an object")
    b: StrictInt = Field(ge=0)
    rel: Literal[RELATIONS]


class Claims(_Strict):
    """The verifier's input, as ``claims(caption)`` builds it; what a client sends as ``metadata.claims``."""

    category: str | None = None
    objects: list[ObjectClaim] = Field(min_length=1)
    relation: RelationClaim | None = None

    @model_validator(mode="after")
    def _related_objects_exist(self) -> "Claims":
        if self.relation is not None:
            for side in ("a", "b"):
                index = getattr(self.relation, side)
                if index >= len(self.objects):  # the field in front: ProtocolError and the CLI read it from there
                    raise ValueError(
                        f"relation.{side}: {index} is not one of the {len(self.objects)} objects (indices from 0)"
                    )
            if self.relation.a == self.relation.b:
                raise ValueError("relation.b: an object cannot be related to itself")
        return self


def checked_claims(value: Any, field: str = "claims") -> dict[str, Any]:
    """``value`` as claims (plain dicts), or a ValueError "<field>.<where>: <problem>" naming the first problem."""
    try:
        return Claims.model_validate(value).model_dump()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join([field, *(str(p) for p in error["loc"])])
        message = error["msg"].removeprefix("Value error, ")
        inner, sep, rest = message.partition(": ")
        if sep and " " not in inner:  # a model-level check names its own field first
            where, message = f"{where}.{inner}", rest
        raise ValueError(f"{where}: {message}") from None


def render(caption: str, seed: int | np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """A uint8 (H, W, 3) image that satisfies every claim of ``caption``, seeded: exactly the objects named
    (a count's worth of them; an unnamed colour drawn at random), apart from each other, on a light
    background with a little noise."""
    from PIL import Image, ImageDraw

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    c = claims(caption)
    objects = [o for o in c["objects"] for _ in range(o["count"] or 1)]
    scale = resolution / 64
    for _ in range(1000):
        sizes = rng.uniform(6, 10 if len(objects) < 3 else 8, len(objects)) * scale  # half-widths in px
        centres = rng.uniform(sizes[:, None] + scale, resolution - sizes[:, None] - scale, (len(objects), 2))
        gaps = [
            np.abs(centres[i] - centres[j]).max() - sizes[i] - sizes[j]
            for i, j in itertools.combinations(range(len(objects)), 2)
        ]
        if gaps and min(gaps) < 3 * scale:
            continue
        if c["relation"] is not None and not _holds(c["relation"]["rel"], centres[0], centres[1], margin=4 * scale):
            continue
        break
    else:  # pragma: no cover - 1-4 objects always fit at 64 px
        raise RuntimeError(f"could not place {caption!r}")
    background = rng.uniform(205, 245) + rng.uniform(-10, 10, 3)
    pixels = np.clip(background + rng.normal(0, 4, (resolution, resolution, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for o, (x, y), r in zip(objects, centres, sizes):
        color = COLORS[o["color"] or list(COLORS)[rng.integers(len(COLORS))]]
        box = [x - r, y - r, x + r, y + r]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=color)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=color)
    return np.asarray(image)


def _holds(rel: str, a: np.ndarray, b: np.ndarray, margin: float) -> bool:
    """Whether centre ``a`` is ``rel`` centre ``b`` (image y grows downwards), by at least ``margin``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel] > margin


def evaluation_captions(part: str = "heldout", per_category: int = 60) -> list[str]:
    """The evaluation prompts of ``part`` ("heldout": trainer/assets/shapes_eval.txt, "train":
    shapes_eval_seen.txt): ``per_category`` per category, cycling through its captions; a category with more
    captions than that takes an even spread of them."""
    out = []
    for category in CATEGORIES:
        captions = split()[part][category]
        if len(captions) > per_category:
            captions = [captions[round(i * len(captions) / per_category)] for i in range(per_category)]
        out += [captions[i % len(captions)] for i in range(per_category)]
    return out


def sample_caption(rng: np.random.Generator, part: str = "train") -> tuple[str, str]:
    """(caption, category): a category uniformly, then one of its captions in ``part`` ("train"/"heldout")."""
    captions = split()[part]
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
    return captions[category][rng.integers(len(captions[category]))], category
