"""The shapes world's verifier, a GenEval-style reward: does the image show what its caption claims?

Segments the image by palette colour (scorers/world.py), finds each colour's connected components,
classifies each as the square, circle or upright triangle whose ideal mask in its bounding box overlaps it
best (a "blob" when none overlaps well: a smear satisfies no claim, so a policy cannot game the verifier
with irregular shapes), and checks the caption's claims: each named object present (a count: exactly that
many), its colour, and the relation of a position prompt. The score is the fraction of claims satisfied
(1.0: fully correct, as GenEval counts an image correct only when every claim holds). The claims come from
the prompt's metadata when the world's prompt function made it (``metadata["claims"]``), else from parsing
the caption.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scorers import world
from scorers.scorer import ScoreOutput, Scorer

PALETTE = np.array(list(world.COLORS.values()), dtype=np.float32)
NAMES = list(world.COLORS)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean mask, as arrays of (y, x) pixel coordinates in row-major order,
    ordered by their first pixel: scipy's one-pass labelling (propagating labels with numpy took as many passes
    as a component is long: a 1 x 1,000,000 image held a server for minutes)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)  # the default structure is the 4-neighbour cross; numbered in scan order
    if n == 0:
        return []
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)
    inside = np.argsort(flat, kind="stable")[counts[0] :]  # each component's pixels in row-major order
    points = np.stack(np.unravel_index(inside, mask.shape), axis=1)
    return np.split(points, np.cumsum(counts[1:])[:-1])


def ideal_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """The square, circle and upright triangle that fill an h x w box, as the renderer draws them."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    return {
        "square": np.ones((h, w), bool),
        "circle": ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2 <= 1.0,
        "triangle": np.abs(x - w / 2) <= y / h * w / 2,
    }


def classify(points: np.ndarray) -> tuple[str, float]:
    """The shape whose ideal mask in the component's bounding box overlaps it best (intersection over union),
    and that overlap; "blob" when none reaches 0.65 or the box is far from square (nothing the world draws)."""
    (y0, x0), (y1, x1) = points.min(0), points.max(0)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    mask = np.zeros((h, w), bool)
    mask[points[:, 0] - y0, points[:, 1] - x0] = True
    fits = {shape: (mask & ideal).sum() / (mask | ideal).sum() for shape, ideal in ideal_masks(h, w).items()}
    shape = max(fits, key=fits.get)
    if fits[shape] < 0.65 or not 0.6 <= w / h <= 1 / 0.6:
        return "blob", float(fits[shape])
    return shape, float(fits[shape])


def detect(image: np.ndarray, min_area: int | None = None) -> list[dict[str, Any]]:
    """The objects in a uint8 (H, W, 3) image: shape, colour, centre (x, y), area in pixels and bounding box
    (x0, y0, x1, y1), exclusive at the far end."""
    h = image.shape[0]
    min_area = min_area or max(4, int(20 * (h / world.RESOLUTION) ** 2))  # smaller specks are noise, not objects
    pixels = image.astype(np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    to_palette = np.linalg.norm(pixels[:, :, None, :] - PALETTE, axis=-1)  # (H, W, colours)
    nearest = to_palette.argmin(-1)
    foreground = (to_palette.min(-1) < 90) & (np.linalg.norm(pixels - background, axis=-1) > 60)
    found = []
    for k, name in enumerate(NAMES):
        for points in components(foreground & (nearest == k)):
            if len(points) < min_area:
                continue
            shape, fit = classify(points)
            (y0, x0), (y1, x1) = points.min(0), points.max(0)
            found.append(
                {
                    "shape": shape,
                    "color": name,
                    "x": float(points[:, 1].mean()),
                    "y": float(points[:, 0].mean()),
                    "area": int(len(points)),
                    "fit": round(fit, 3),
                    "box": (int(x0), int(y0), int(x1) + 1, int(y1) + 1),
                }
            )
    return found


def verify(image: np.ndarray, claims: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(fraction of claims satisfied, what was found and which claims failed)."""
    found = detect(image)
    failed, total, chosen = [], 0, []
    for o in claims["objects"]:
        matches = [d for d in found if d["shape"] == o["shape"] and (o["color"] is None or d["color"] == o["color"])]
        name = f"{o['color'] + ' ' if o['color'] else ''}{o['shape']}"
        total += 1
        if o["count"] is not None and len(matches) != o["count"]:
            failed.append(f"{o['count']} x {name} (found {len(matches)})")
        elif not matches:
            failed.append(f"a {name}")
        chosen.append(max(matches, key=lambda d: d["area"]) if matches else None)
    relation = claims.get("relation")
    if relation is not None:
        total += 1
        a, b = chosen[relation["a"]], chosen[relation["b"]]
        if (
            a is None
            or b is None
            or not world._holds(relation["rel"], np.array([a["x"], a["y"]]), np.array([b["x"], b["y"]]), margin=1.0)
        ):
            failed.append(relation["rel"])
    score = 1.0 - len(failed) / total
    return score, {
        "found": [f"{d['color']} {d['shape']} at ({d['x']:.0f}, {d['y']:.0f})" for d in found],
        "failed": failed,
        "correct": not failed,
    }


class ShapesVerifier(Scorer):
    name = "shapes"
    description = (
        "fraction of the caption's claims (objects, counts, colours, positions) the image satisfies, "
        "checked by the shapes world's verifier; 1.0 = fully correct (option strict: 1 or 0, all claims or not)"
    )
    max_batch = 256

    def __init__(self, strict: bool = False):
        # strict: 1 only when every claim holds, what the evaluation's accuracy (and GenEval) counts; the
        # fraction of claims gives partial credit, a denser reward that need not raise the accuracy
        self.strict = strict

    def check(self, prompts, metadata) -> None:
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            _claims(i, prompt, meta)

    def score(self, images, prompts, metadata) -> ScoreOutput:
        scores, info = [], {"correct": [], "category": [], "failed": [], "found": []}
        for i, (image, prompt, meta) in enumerate(zip(images, prompts, metadata)):
            claims = _claims(i, prompt, meta)  # in process nothing called check() first
            score, details = verify(image, claims)
            scores.append(float(details["correct"]) if self.strict else score)
            info["category"].append(claims.get("category"))
            for key in ("correct", "failed", "found"):
                info[key].append(details[key])
        return ScoreOutput(np.array(scores, dtype=np.float64), info)


def _claims(i: int, prompt: str, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Image i's claims: its metadata's, checked field by field (a malformed one is the client's 422, not a
    scorer crash), else its caption's; ValueError naming ``metadata.i.claims...`` or ``prompts.i``."""
    given = (meta or {}).get("claims")
    if given is not None:
        return world.checked_claims(given, f"metadata.{i}.claims")
    try:
        return world.claims(prompt)
    except ValueError as e:
        raise ValueError(f"prompts.{i}: {e}") from None
