"""GenEval's rules (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment"; djghosh13/geneval evaluation/evaluate_images.py), on detections from any detector: pure numpy.

An image's detections are kept per class above a score threshold (0.3; 0.9 for the counting tag), the most
confident 16 of each class, optionally de-duplicated by box overlap (GenEval's ``max_overlap``, 1.0 = off,
its default). Its prompt's metadata (evaluation_metadata.jsonl: ``tag``, ``include`` [{class, count,
color?, position?}], ``exclude`` [{class, count}]) is then checked requirement by requirement:

- ``evaluate`` is GenEval's correctness: each include needs at least ``count`` objects of its class, the
  ``count`` most confident of them in its colour (``colors_of``: CLIP zero-shot in scorers/geneval.py)
  and each of them in its relation to every object of the group it refers to; an exclude fails when
  ``count`` or more are found.
- ``fraction`` is Flow-GRPO's training reward (yifan123/reward-server, reward_server/gen_eval.py
  ``evaluate_reward``): the mean of one term per requirement part, each 1 when it holds.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

# GenEval's prompts/object_names.txt: the 80 COCO classes in COCO's label order.
CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# evaluate_images.py's option defaults (its --options threshold=... etc.)
DEFAULTS = {
    "threshold": 0.3,
    "counting_threshold": 0.9,
    "max_objects": 16,
    "max_overlap": 1.0,
    "position_threshold": 0.1,
}

Detection = dict[str, Any]  # {"class": str, "score": float, "box": (x0, y0, x1, y1), "mask": bool (H, W) or None}
ColorsOf = Callable[[str, list[Detection]], list[str]]  # colour names of these objects of one class


# -- metadata ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Include(_Strict):
    class_: Literal[CLASSES] = Field(alias="class")
    count: StrictInt = Field(ge=1)
    color: Literal[COLORS] | None = None
    position: tuple[Literal[RELATIONS], StrictInt] | None = None


class Exclude(_Strict):
    class_: Literal[CLASSES] = Field(alias="class")
    count: StrictInt = Field(ge=1)


class Metadata(_Strict):
    model_config = ConfigDict(extra="ignore", frozen=True)  # GenEval's rows also carry "prompt"
    tag: Literal[TAGS]
    include: list[Include] = Field(min_length=1)
    exclude: list[Exclude] | None = None

    @model_validator(mode="after")
    def _positions_refer_back(self) -> "Metadata":
        for i, req in enumerate(self.include):
            if req.position is not None and not 0 <= req.position[1] < i:
                earlier = f"one of the earlier includes 0..{i - 1}" if i else "an earlier include (the first has none)"
                raise ValueError(f"include.{i}.position: {req.position[1]} is not {earlier}")
        return self


def checked(value: Any, field: str = "metadata") -> dict[str, Any]:
    """GenEval metadata as plain dicts (``class`` spelled as GenEval does; no ``color``/``position`` keys when
    absent), or ValueError "<field>.<where>: <problem>" naming the first problem."""
    try:
        parsed = Metadata.model_validate(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join([field, *(str(p) for p in error["loc"])])
        message = error["msg"].removeprefix("Value error, ")
        inner, sep, rest = message.partition(": ")
        if sep and " " not in inner:  # the model-level check names its own field first
            where, message = f"{where}.{inner}", rest
        raise ValueError(f"{where}: {message}") from None
    out = parsed.model_dump(by_alias=True, exclude_none=True)
    for req in out["include"]:
        if "position" in req:
            req["position"] = list(req["position"])
    return out


# -- captions (GenEval's prompts/create_prompts.py templates) ---------------------------------------------
def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


_CLASS = "|".join(sorted(map(re.escape, CLASSES), key=len, reverse=True))
_COLOR = "|".join(COLORS)
_OBJ = rf"an? (?:(?P<{{0}}c>{_COLOR}) )?(?P<{{0}}>{_CLASS})"
_PLURALS = {plural(c): c for c in CLASSES}
_CAPTIONS = [
    ("counting", re.compile(rf"(?P<n>{'|'.join(NUMBERS[2:])}) (?P<a>{'|'.join(map(re.escape, _PLURALS))})")),
    ("position", re.compile(rf"{_OBJ.format('a')} (?P<r>{'|'.join(RELATIONS)}) {_OBJ.format('b')}")),
    ("pair", re.compile(rf"{_OBJ.format('a')} and {_OBJ.format('b')}")),
    ("one", re.compile(_OBJ.format("a"))),
]


def parse(caption: str) -> dict[str, Any]:
    """The metadata GenEval's create_prompts.py writes for a caption it generates ("a photo of two dogs",
    "a photo of a red car and a blue bench", ...; "a photo of" may be left out); ValueError otherwise."""
    text = " ".join(caption.lower().strip().rstrip(".").split()).removeprefix("a photo of ")
    for kind, pattern in _CAPTIONS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        if kind == "counting":
            n, name = NUMBERS.index(g["n"]), _PLURALS[g["a"]]
            return {
                "tag": "counting",
                "include": [{"class": name, "count": n}],
                "exclude": [{"class": name, "count": n + 1}],
            }
        objs = [{"class": g[k], "count": 1, **({"color": g[f"{k}c"]} if g[f"{k}c"] else {})} for k in "ab" if g.get(k)]
        if kind == "position":
            if any("color" in o for o in objs):
                break  # GenEval has no coloured position prompts
            return {"tag": "position", "include": [objs[1], {**objs[0], "position": [g["r"], 0]}]}
        colored = any("color" in o for o in objs)
        if kind == "pair" and colored and not all("color" in o for o in objs):
            break
        tag = {
            ("pair", False): "two_object",
            ("pair", True): "color_attr",
            ("one", False): "single_object",
            ("one", True): "colors",
        }[kind, colored]
        return {"tag": tag, "include": objs}
    raise ValueError(
        f"caption {caption!r} is not a GenEval prompt (e.g. 'a photo of a dog', 'a photo of two cats', "
        "'a photo of a red car', 'a photo of a cup left of a vase', 'a photo of a red car and a blue bench'; "
        "COCO class names, GenEval's colours); or send GenEval's metadata (tag, include, exclude)"
    )


def sample(rng: np.random.Generator, tag: str) -> dict[str, Any]:
    """A prompt of ``tag`` with its metadata, drawn exactly as GenEval's create_prompts.py draws one (the same
    calls on the Generator: its seed 43 gives its suite back), the row its evaluation_metadata.jsonl holds.
    Counts are 2-4; no "person" is coloured (COCO's class 0: the draw skips it)."""
    n = len(CLASSES)
    if tag == "single_object":
        name = CLASSES[rng.choice(n)]
        return {"tag": tag, "include": [{"class": name, "count": 1}], "prompt": f"a photo of {with_article(name)}"}
    if tag == "two_object":
        a, b = (CLASSES[i] for i in rng.choice(n, size=2, replace=False))
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
        }
    if tag == "counting":
        name = CLASSES[rng.choice(n)]
        count = int(rng.integers(2, 4, endpoint=True))
        return {
            "tag": tag,
            "include": [{"class": name, "count": count}],
            "exclude": [{"class": name, "count": count + 1}],
            "prompt": f"a photo of {NUMBERS[count]} {plural(name)}",
        }
    if tag == "colors":
        name = CLASSES[rng.choice(n - 1) + 1]
        color = COLORS[rng.choice(len(COLORS))]
        return {
            "tag": tag,
            "include": [{"class": name, "count": 1, "color": color}],
            "prompt": f"a photo of {with_article(color)} {name}",
        }
    if tag == "position":
        a, b = (CLASSES[i] for i in rng.choice(n, size=2, replace=False))
        rel = RELATIONS[rng.choice(len(RELATIONS))]
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}",
        }
    if tag == "color_attr":
        a, b = (CLASSES[i] for i in rng.choice(n - 1, size=2, replace=False) + 1)
        ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}",
        }
    raise ValueError(f"tag {tag!r} is not one of GenEval's: {', '.join(TAGS)}")


# -- detections -------------------------------------------------------------------------------------------
def box_iou(a, b) -> float:
    """GenEval's compute_iou (inclusive pixel boxes: +1 on each side)."""
    area = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0


def select(detections: list[Detection], tag: str, options: dict[str, float] = DEFAULTS) -> dict[str, list[Detection]]:
    """GenEval's evaluate_image: per class, detections scoring above the threshold (the counting threshold for
    the counting tag), the most confident ``max_objects``, then greedily those overlapping a kept one by
    ``max_overlap`` or more dropped (1.0: none). Classes with nothing kept are absent."""
    threshold = options["counting_threshold"] if tag == "counting" else options["threshold"]
    kept: dict[str, list[Detection]] = {}
    for name in dict.fromkeys(d["class"] for d in detections):
        # GenEval orders by np.argsort(scores)[::-1]: a stable ascending sort reversed, so of two equal scores
        # the later detection comes first (numpy's default sort is stable on GenEval's at most 16 per class).
        ordering = sorted(
            (d for d in detections if d["class"] == name and d["score"] > threshold), key=lambda d: d["score"]
        )[::-1]
        ordering = ordering[: int(options["max_objects"])]
        while ordering:
            best = ordering.pop(0)
            kept.setdefault(name, []).append(best)
            if options["max_overlap"] != 1:
                ordering = [d for d in ordering if box_iou(best["box"], d["box"]) < options["max_overlap"]]
    return kept


def relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """GenEval's relative_position: where A is relative to B. The centres' offset, each axis shrunk by
    ``threshold`` x the two boxes' summed extent on it, as a fraction of the unshrunk distance: beyond 0.5
    on an axis names that side (so diagonals may name two, and near-overlapping boxes none)."""
    boxes = np.array([box_a, box_b], dtype=np.float64)[:, :4].reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {
        rel
        for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
        if holds
    }


def _position_failure(req, found, target, threshold) -> str | None:
    """Why ``found`` objects are not all at ``req``'s relation to every object of ``target`` (None: they are)."""
    expected = req["position"][0]
    for obj in found:
        for other in target:
            true_rels = relative_position(obj["box"], other["box"], threshold)
            if expected not in true_rels:
                found = " and ".join(sorted(true_rels)) or "no relation to"
                return f"expected {req['class']} {expected} target, found {found} target"
    return None


def _color_failure(req, colors: list[str], count: int) -> str | None:
    got = colors.count(req["color"])
    if got >= count:
        return None
    others = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
    return f"expected {req['color']} {req['class']}>={count}, found {got} {req['color']}; and {others}"


def evaluate(
    objects: dict[str, list[Detection]], metadata: dict[str, Any], colors_of: ColorsOf, position_threshold: float = 0.1
) -> tuple[bool, list[str]]:
    """GenEval's evaluate: (every requirement holds, the reasons of those that do not). Colour and position
    are judged on the ``count`` most confident objects of the class, as GenEval does."""
    reasons, groups = [], []
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        failure = None
        if len(found) < count:
            failure = f"expected {name}>={count}, found {len(found)}"
        elif "color" in req:
            failure = _color_failure(req, colors_of(name, found), count)
        if failure is None and "position" in req:
            target = groups[req["position"][1]]
            failure = (
                f"no target for {name} to be {req['position'][0]}"
                if target is None
                else _position_failure(req, found, target, position_threshold)
            )
        groups.append(None if failure else found)
        reasons += [failure] if failure else []
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, reasons


def fraction(
    objects: dict[str, list[Detection]],
    metadata: dict[str, Any],
    colors_of: ColorsOf,
    position_threshold: float = 0.1,
    rule: Literal["parts", "flow_grpo"] = "parts",
) -> float:
    """Flow-GRPO's training reward (its evaluate_reward): the mean over the includes' terms. Each include
    gives 1 - |count - n found| / count on all its class's objects (negative beyond twice the count, as
    there; excludes are not read, the count term covers them); a colour, 0 unless exactly ``count`` were
    found, else 1 - |count - n in colour| / count; a position, 1 when every found object is at the relation
    to every object of an exactly-matched target group, else 0.

    ``rule`` parts (ours) counts each part once. flow_grpo is the reward as Flow-GRPO's and DiffusionNFT's
    gen_eval.py compute it, which differs on failures only: a failed position adds a 0 and then a 1 (so a
    "left of" caption with both objects found once and the relation wrong scores 3/4 there, 2/3 here); an
    include whose count fails adds one 0 for its colour and position together; a failed colour adds no
    position term."""
    if rule == "flow_grpo":
        return _flow_grpo_fraction(objects, metadata, colors_of, position_threshold)
    terms, groups = [], []
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])
        terms.append(1 - abs(count - len(found)) / count)
        exact = len(found) == count
        if "color" in req:
            colors = colors_of(name, found) if exact else []
            terms.append(1 - abs(count - colors.count(req["color"])) / count if exact else 0.0)
            exact = exact and colors.count(req["color"]) == count
        if "position" in req:
            target = groups[req["position"][1]]
            holds = exact and target is not None and _position_failure(req, found, target, position_threshold) is None
            terms.append(1.0 if holds else 0.0)
            exact = holds
        groups.append(found if exact else None)
    return float(np.mean(terms))


def _flow_grpo_fraction(objects, metadata, colors_of: ColorsOf, position_threshold: float) -> float:
    """``fraction`` with rule flow_grpo: the terms as gen_eval.py's evaluate_reward appends them."""
    terms, groups = [], []
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = objects.get(name, [])
        terms.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            terms += [0.0] if "color" in req or "position" in req else []
        else:
            if "color" in req:
                in_color = colors_of(name, found).count(req["color"])
                terms.append(1 - abs(count - in_color) / count)
                matched = in_color == count
            if "position" in req and matched:
                target = groups[req["position"][1]]
                failed = target is None or _position_failure(req, found, target, position_threshold) is not None
                matched = not failed
                # no target: a 0; a failed relation: a 0, then the 1 every checked position appends
                terms += [0.0] if target is None else [0.0, 1.0] if failed else [1.0]
        groups.append(found if matched else None)
    return float(np.mean(terms)) if terms else 0.0
