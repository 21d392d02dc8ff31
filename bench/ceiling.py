"""The shapes world's ceiling, and how varied its samples are: N deterministic samples of every distinct caption of
an evaluation file, from the base model or a run's weights, checked by the world's verifier.

    python -m bench.ceiling --preset shapes-sd3-nft --n 16                     # the base model, training captions
    python -m bench.ceiling --preset shapes-sd3-nft --lora outputs/shapes-sd3-nft/lora --prompts heldout

Image i of a caption starts from seed ``run.eval_seed + i`` and samples as the trainer evaluates (its steps and
guidance, eta 0). Printed as JSON, overall (each caption weighted by its lines in the file, as the evaluation's
accuracy weighs it) and per category:

- ``accuracy``: the share of the N samples whose every claim holds (the evaluation's number, on more seeds);
- ``best_of_n``: the share of captions with at least one accepted sample among N. For the base model this is the
  ceiling of a policy that only learns to draw, every time, what the base already draws sometimes (at N
  samples: a larger N raises it);
- ``distinct_layouts``: per caption, the distinct layouts among its N samples over N, a layout being the set of
  detected objects' colour, shape and third of the image across and down. A policy that collapses onto one
  accepted picture per caption scores 1 / N here, one that keeps the base's variety as much as the base.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from trainer.prompts import ASSETS

FILES = {"seen": ASSETS / "shapes_eval_seen.txt", "heldout": ASSETS / "shapes_eval.txt"}


def layout(image: np.ndarray) -> tuple:
    """The detected objects' (colour, shape, column, row), the image cut in thirds each way; sorted."""
    from scorers.shapes import detect

    h, w = image.shape[:2]
    return tuple(sorted((d["color"], d["shape"], int(3 * d["x"] / w), int(3 * d["y"] / h)) for d in detect(image)))


def measure(images: np.ndarray, correct: np.ndarray, captions: list[str], n: int, weights: Counter, category) -> dict:
    """The three measures, overall and per category, of ``images`` (captions x n, caption-major) and their
    verdicts."""
    per: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for k, caption in enumerate(captions):
        rows = slice(k * n, (k + 1) * n)
        distinct = len({layout(image) for image in images[rows]}) / n
        for where in ("all", category(caption)):
            for name, value in (("accuracy", correct[rows].mean()), ("best_of_n", correct[rows].any())):
                per[where][name].append((float(value), weights[caption]))
            per[where]["distinct_layouts"].append((distinct, 1))

    def mean(pairs: list) -> float:
        values, w = np.array(pairs).T
        return round(float(100 * (values * w).sum() / w.sum()), 1)

    table = {where: {name: mean(pairs) for name, pairs in measures.items()} for where, measures in per.items()}
    return table.pop("all") | {"per_category": table}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes-sd3-nft")
    parser.add_argument("--lora", type=Path, help="a run's lora/ folder (default: the base model)")
    parser.add_argument("--prompts", choices=sorted(FILES), default="seen")
    parser.add_argument("--n", type=int, default=16, help="samples per distinct caption")
    known, overrides = parser.parse_known_args(argv)

    import torch
    from pydantic_settings import CliApp

    from scorers import world
    from trainer.config import Config
    from trainer.evaluate import evaluate
    from trainer.families.models import load_family, load_tuned
    from trainer.rewards import Rewards

    cfg = CliApp.run(Config, cli_args=["--preset", known.preset, *overrides])
    lines = FILES[known.prompts].read_text().splitlines()
    weights, captions = Counter(lines), list(dict.fromkeys(lines))
    prompts = [c for c in captions for _ in range(known.n)]
    claims = {c: world.claims(c) for c in captions}  # parsed once per caption
    if cfg.prompt.fn != "shapes" or cfg.reward.scorer != "shapes":
        raise SystemExit(f"--preset {known.preset}: a shapes-world preset rewarded by its verifier")
    family = load_family(cfg, torch.device("cpu"))
    load_tuned(family, known.lora)
    rewards = Rewards(cfg.reward)
    try:
        images, scored = evaluate(
            family,
            family.denoiser,
            prompts,
            [{"claims": claims[p]} for p in prompts],
            rewards,
            num_steps=cfg.sample.eval_num_steps or cfg.sample.num_steps,
            guidance_scale=cfg.sample.guidance_scale,
            resolution=cfg.sample.resolution or family.native_resolution(),
            seeds=[cfg.run.eval_seed + i % known.n for i in range(len(prompts))],
            batch_size=cfg.sample.batch_size,
        )
    finally:
        rewards.close()
    correct = scored["shapes"].scores == 1.0
    category = {c: claims[c]["category"] for c in captions}.get
    result = {
        "benchmark": "ceiling",
        "preset": known.preset,
        "lora": str(known.lora) if known.lora else None,
        "prompts": known.prompts,
        "captions": len(captions),
        "n": known.n,
        **measure(images, correct, captions, known.n, weights, category),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
