"""The shipped shapes-world checkpoints, measured: how well tiny-shapes follows held-out captions, and how
well the tiny CLIP's scores agree with the verifier.

    python -m bench.shapes_world [--steps 20] [--guidance 5]

Prints JSON: the base model's verifier accuracy (every claim holds) and mean score on the held-out
evaluation set (60 images per category, each its own seed, deterministic DDIM), per category; then, on
those same images, the Pearson and Spearman correlation of the CLIP score (and PickScore-style score) of
the tiny CLIP with the verifier's score: over all images, and within prompts (scores minus their prompt's
mean: what a policy gradient compares), and the share of rendered held-out images whose true caption the
CLIP ranks above a one-claim-changed caption.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)


def correlations(a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> dict:
    def within(x):
        return x - np.array([x[groups == g].mean() for g in groups])

    pearson = lambda x, y: round(float(np.corrcoef(x, y)[0, 1]), 3)  # noqa: E731
    return {
        "pearson": pearson(a, b),
        "spearman": pearson(ranks(a), ranks(b)),
        "pearson_within_prompt": pearson(within(a), within(b)),
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    from scorers import world
    from scorers.scorer import create_scorer
    from scorers.shapes_clip import hard_negative
    from trainer.config import Config
    from trainer.evaluate import evaluate
    from trainer.families.models import load_family
    from trainer.prompts import ASSETS, lines
    from trainer.rewards import Rewards
    from trainer.tracking import by_category, sample_records

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(pretrained={"model": "tiny-shapes"}, reward={"scorer": "shapes"})
    family = load_family(cfg, torch.device("cpu"))
    prompts = list(lines(ASSETS / "shapes_eval.txt"))
    rewards = Rewards(cfg.reward, device="cpu")
    seeds = [cfg.run.eval_seed + i for i in range(len(prompts))]  # the trainer's evaluation images
    images, scored = evaluate(
        family,
        family.denoiser,
        prompts,
        [{}] * len(prompts),
        rewards,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        resolution=64,
        seeds=seeds,
        batch_size=32,
    )
    rewards.close()
    verifier = scored["shapes"].scores
    result = {
        "benchmark": "shapes_world",
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "images": len(prompts),
        "base_model": {
            "verifier_score": round(float(verifier.mean()), 4),
            **{
                k: round(100 * v, 1) if "accuracy" in k else round(v, 4)
                for k, v in by_category(sample_records(0, 0, prompts, scored), verifier).items()
            },
        },
    }
    groups = np.array([sorted(set(prompts)).index(p) for p in prompts])
    for name in ("clipscore", "pickscore"):
        scorer = create_scorer(name, checkpoint="tiny-shapes")
        scorer.load("cpu")
        clip = scorer.score(images, prompts, [{}] * len(prompts)).scores
        result[f"{name}_vs_verifier"] = correlations(clip, verifier, groups)
    rng = np.random.default_rng(0)
    renders, true, changed = [], [], []
    for caption in prompts:
        renders.append(world.render(caption, rng))
        true.append(caption)
        changed.append(hard_negative(caption, rng))
    renders = np.stack(renders)
    right = (
        scorer.score(renders, true, [{}] * len(true)).scores > scorer.score(renders, changed, [{}] * len(true)).scores
    )
    result["clip_prefers_true_caption_over_one_claim_changed"] = round(float(right.mean()), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
