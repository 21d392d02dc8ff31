"""Does a run learn? Train, then report the reward curve and, for a run that evaluates (the shapes presets),
held-out accuracy before and after with the rise in units of its standard error.

    python -m bench.learning                                  # the default run (preset shapes)
    python -m bench.learning --preset tiny --run.num_epochs 110
    python -m bench.learning --compare shapes,shapes-nokl     # one after the other, the same overrides
    python -m bench.learning --preset shapes-nft --also-guidance 1  # held-out and seen also at guidance 1

Prints JSON per run. The reward curve's rise (mean of the last 3 epochs - mean of the first 3) is given in
two units: the spread of rewards within an epoch (mean of the per-epoch std) and the noise of an epoch's
mean (from successive differences, which cancel slow trends). With evaluation (``run.eval_every``), the
accuracy (share of images whose every claim holds) on the same prompts and seeds before and after: the rise
in points, its standard error from the paired per-image differences, per category, and points per minute
of wall time (the runs of ``--compare`` share the machine, so their minutes compare). On the shapes world
the same change is also measured on training captions (``seen``: shapes_eval_seen.txt, 60 images per
category), what the run optimised, beside the held-out compositions it never saw.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic_settings import CliApp

from trainer.config import Config
from trainer import train
from trainer.prompts import ASSETS


def accuracy_change(before: dict, after: dict) -> dict:
    """Before/after accuracy of two eval.jsonl records of the same prompts and seeds (per image, paired)."""
    key = next(k for k in before["per_prompt"][0] if k.startswith("reward_") and k != "reward")
    correct = [np.array([s == 1.0 for p in record["per_prompt"] for s in p[key]]) for record in (before, after)]
    difference = correct[1].astype(float) - correct[0]
    rise, se = 100 * difference.mean(), 100 * difference.std(ddof=1) / np.sqrt(len(difference))
    categories = sorted({k.split("/")[1] for k in before if k.startswith("category/") and k.endswith("/accuracy")})
    return {
        "images": len(difference),
        "accuracy_before": round(100 * correct[0].mean(), 1),
        "accuracy_after": round(100 * correct[1].mean(), 1),
        "rise_points": round(rise, 1),
        "rise_standard_error": round(se, 2),
        "rise_in_standard_errors": round(rise / se, 1) if se else None,
        "per_category": {
            c: {
                "before": round(100 * before[f"category/{c}/accuracy"], 1),
                "after": round(100 * after[f"category/{c}/accuracy"], 1),
            }
            for c in categories
        },
        "verifier_score_before": round(before["reward_mean"], 4),
        "verifier_score_after": round(after["reward_mean"], 4),
    }


_BEFORE: dict[str, dict] = {}  # the base model's evaluations, shared by the runs of one process


def shapes_change(
    cfg: Config, out: Path, prompts: Path = ASSETS / "shapes_eval_seen.txt", guidance_scale: float | None = None
) -> dict | None:
    """``accuracy_change`` of a shapes-world run on ``prompts`` (by default its training captions): the base
    model and the run's saved weights in ``out``, each evaluated as the trainer evaluates (its steps, guidance
    unless ``guidance_scale`` is given, and eval seeds); None for a run outside the shapes world."""
    from trainer.tools.evaluate import EvalSettings, run_evaluation

    if cfg.prompt.fn != "shapes":
        return None
    tuned = (
        {"lora": out / "lora"}
        if cfg.train.lora
        else {"denoiser": next(out / d for d in ("unet", "transformer") if (out / d).is_dir())}
    )
    settings = dict(
        model=cfg.pretrained.model,
        prompts=prompts,
        prompt_fn="shapes",
        seed=cfg.run.eval_seed,
        steps=cfg.sample.eval_num_steps or cfg.sample.num_steps,
        guidance_scale=cfg.sample.guidance_scale if guidance_scale is None else guidance_scale,
        batch_size=cfg.sample.batch_size,
        reward="shapes",  # the world's accuracy is its verifier's, whatever rewarded the run (a judge, CLIP)
    )
    key, name = (
        json.dumps(settings, default=str, sort_keys=True),
        f"{prompts.stem}-guidance-{settings['guidance_scale']:g}",
    )
    if key not in _BEFORE:  # the same for every run of a --compare or of bench.dpo's modes
        _BEFORE[key] = run_evaluation(EvalSettings(**settings, out=out / f"{name}-before"))
    return accuracy_change(_BEFORE[key], run_evaluation(EvalSettings(**settings, **tuned, out=out / f"{name}-after")))


def bench_config(args: list[str], output_dir: str) -> Config:
    """The trainer's config from command-line overrides, preset shapes unless one is given, nothing logged."""
    preset = [] if "--preset" in args else ["--preset", "shapes"]
    return CliApp.run(Config, cli_args=[*preset, "--run.output_dir", output_dir, "--run.log_with", "none", *args])


def bench(args: list[str], also_guidance: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args, tmp)
        start = time.perf_counter()
        history = train(cfg)
        wall = time.perf_counter() - start
        evals = (
            [json.loads(line) for line in (Path(tmp) / "eval.jsonl").read_text().splitlines()]
            if cfg.run.eval_every
            else []
        )
        seen = shapes_change(cfg, Path(tmp)) if len(evals) >= 2 else None
        other_guidance = (
            {
                f"{name}_guidance_{also_guidance:g}": shapes_change(cfg, Path(tmp), prompts, also_guidance)
                for name, prompts in (("heldout", cfg.prompt.eval_path), ("seen", ASSETS / "shapes_eval_seen.txt"))
            }
            if seen and also_guidance is not None
            else {}
        )
    means = np.array([m["reward_mean"] for m in history])
    stds = np.array([m["reward_std"] for m in history])
    k = min(3, len(means))
    rise = means[-k:].mean() - means[:k].mean()
    result = {
        "benchmark": "learning",
        "preset": cfg.preset,
        "config": cfg.model_dump(mode="json", include={"algorithm", "sample", "train", "nft"}),
        "epochs": len(history),
        "wall_seconds": round(wall, 1),
        "reward_mean_per_epoch": [round(float(x), 4) for x in means],
        "rise_in_epoch_std": round(float(rise / stds.mean()), 2),
        "rise_in_epoch_mean_noise": round(float(rise / (np.diff(means).std() / np.sqrt(2))), 2)
        if len(means) > 2
        else None,
        "seconds_per_epoch": {
            part: round(float(np.median([m[f"seconds_{part}"] for m in history])), 2)
            for part in ("sampling", "reward_wait", "training")
        },
    }
    if len(evals) >= 2:
        result["heldout"] = accuracy_change(evals[0], evals[-1])
        result["heldout"]["points_per_minute"] = round(result["heldout"]["rise_points"] / (wall / 60), 2)
    if seen is not None:
        result["seen"] = seen
    result |= other_guidance  # e.g. at guidance 1, DiffusionNFT's claim: the tuned model needs no guidance
    return result


def main() -> None:
    args = sys.argv[1:]
    also_guidance = None
    if "--also-guidance" in args:
        i = args.index("--also-guidance")
        also_guidance, args = float(args[i + 1]), args[:i] + args[i + 2 :]
    if "--compare" in args:
        i = args.index("--compare")
        presets, args = args[i + 1].split(","), args[:i] + args[i + 2 :]
        for preset in presets:
            print(json.dumps(bench(["--preset", preset, *args], also_guidance)), flush=True)
    else:
        print(json.dumps(bench(args, also_guidance)))


if __name__ == "__main__":
    main()
